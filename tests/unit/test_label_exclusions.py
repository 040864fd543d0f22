"""``data.exclude_label_issues``: split drops the champion's flagged train/val images, by path and content, never
test rows; the stage writes nothing but a header when the flag is off and fails closed when MLflow is unreachable.

The stage against a real MLflow server with a real logged report: tests/integration/test_label_exclusions.py.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import config_from_dict
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_csv, write_csv
from pipeline.stages.label_exclusions import FIELDS, exclusion_rows
from pipeline.stages.split import SPLIT_FIELDS, assign_splits, drop_excluded, run_split
from pipeline.stages.validate import VALIDATED_FIELDS
from tests.conftest import run_cli

pytestmark = pytest.mark.unit


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _validated(n_per_class: int = 40) -> list[dict]:
    """Two classes of distinct images (no duplicates), enough groups for a real train/val/test split."""
    return [
        {"path": f"{c}/img{i:03d}.png", "class_name": c, "sha256": _sha(f"{c}{i}"), "dhash": ""}
        for c in ("crack", "mold")
        for i in range(n_per_class)
    ]


def _cfg():
    return config_from_dict({"data": {"landing_uri": "s3://x/"}})


def _pick(rows: list[dict], split: str, n: int) -> list[dict]:
    return [r for r in rows if r["split"] == split][:n]


def test_flagged_train_and_val_images_leave_test_images_stay():
    rows, _ = assign_splits(_validated(), _cfg())
    train, val, test = _pick(rows, "train", 3), _pick(rows, "val", 2), _pick(rows, "test", 1)
    listed = [{"path": r["path"], "sha256": r["sha256"], "source_version": "7"} for r in train + val + test]
    kept, counts = drop_excluded(rows, listed)
    gone = {r["path"] for r in train + val}
    assert {r["path"] for r in kept} == {r["path"] for r in rows} - gone
    assert test[0] in kept  # the gate's test split never changes
    assert counts == {
        "listed": 6,
        "dropped_train": 3,
        "dropped_val": 2,
        "kept_in_test": 1,
        "not_matched": 0,
        "source_versions": ["7"],
    }
    assert kept == [r for r in rows if r["path"] not in gone]  # nobody else moved


def test_a_relabelled_or_resaved_image_trains_again():
    """Both path and content must match: the same bytes under the corrected class folder (relabelled), or new
    bytes at the old path (fixed and re-uploaded), are different images now."""
    rows, _ = assign_splits(_validated(), _cfg())
    moved, resaved = _pick(rows, "train", 2)
    listed = [
        {"path": moved["path"], "sha256": moved["sha256"]},
        {"path": resaved["path"], "sha256": resaved["sha256"]},
        {"path": rows[0]["path"], "sha256": ""},
    ]  # no content hash: matches nothing
    other = "mold" if moved["class_name"] == "crack" else "crack"
    relabelled = dict(moved, path=f"{other}/{Path(moved['path']).name}", class_name=other)  # same bytes, moved
    fixed = dict(resaved, sha256=_sha("the re-saved bytes"))  # same path, new bytes
    now = [relabelled if r is moved else fixed if r is resaved else r for r in rows]
    kept, counts = drop_excluded(now, listed)
    assert kept == now
    assert counts["not_matched"] == 3 and counts["dropped_train"] == counts["dropped_val"] == 0


def test_run_split_with_an_exclusion_file_keeps_every_other_assignment(tmp_path):
    write_csv(tmp_path / "validated.csv", _validated(), VALIDATED_FIELDS)
    run_split(_cfg(), tmp_path / "validated.csv", tmp_path / "before.csv", tmp_path / "before.json")
    before = read_csv(tmp_path / "before.csv")
    flagged = _pick(before, "train", 4) + _pick(before, "val", 1) + _pick(before, "test", 1)
    write_csv(tmp_path / "excl.csv", [dict(r, source_version="3") for r in flagged], FIELDS)
    report = run_split(
        _cfg(), tmp_path / "validated.csv", tmp_path / "after.csv", tmp_path / "after.json", tmp_path / "excl.csv"
    )
    after = read_csv(tmp_path / "after.csv")
    assert after == [r for r in before if r["path"] not in {f["path"] for f in flagged[:5]}]
    assert report["excluded"] == json.loads((tmp_path / "after.json").read_text())["excluded"]
    assert report["excluded"]["dropped_train"] == 4 and report["excluded"]["dropped_val"] == 1
    assert report["excluded"]["kept_in_test"] == 1 and report["excluded"]["source_versions"] == ["3"]
    # the flag off: an empty file (header only) changes nothing
    write_csv(tmp_path / "empty.csv", [], FIELDS)
    run_split(_cfg(), tmp_path / "validated.csv", tmp_path / "same.csv", tmp_path / "same.json", tmp_path / "empty.csv")
    assert (tmp_path / "same.csv").read_bytes() == (tmp_path / "before.csv").read_bytes()
    assert list(before[0]) == SPLIT_FIELDS
    # the flag on and no list at all (label_exclusions did not run): refuse rather than train on everything
    on = config_from_dict({"data": {"landing_uri": "s3://x/", "exclude_label_issues": True}})
    with pytest.raises(PipelineError, match="run stage label_exclusions first"):
        run_split(on, tmp_path / "validated.csv", tmp_path / "x.csv", tmp_path / "x.json", tmp_path / "missing.csv")


def test_exclusion_rows_are_the_flagged_rows_with_their_sha256():
    issues = [
        {
            "rank": "1",
            "path": "b/2.png",
            "split": "train",
            "given_class": "b",
            "suggested_class": "a",
            "label_quality": "0.01",
            "issue": "True",
            "p_given": "0.01",
            "source": "oob:member_0",
        },
        {
            "rank": "2",
            "path": "a/1.png",
            "split": "val",
            "given_class": "a",
            "suggested_class": "b",
            "label_quality": "0.02",
            "issue": "True",
            "p_given": "0.02",
            "source": "val:all_members",
        },
        {
            "rank": "3",
            "path": "a/3.png",
            "split": "train",
            "given_class": "a",
            "suggested_class": "a",
            "label_quality": "0.9",
            "issue": "False",
            "p_given": "0.9",
            "source": "oob:member_1",
        },
    ]
    split = [
        {"path": "a/1.png", "sha256": "s1"},
        {"path": "b/2.png", "sha256": "s2"},
        {"path": "a/3.png", "sha256": "s3"},
    ]
    got = exclusion_rows(issues, split, "12", "run-x")
    # the flagged val image stays: val is the yardstick
    assert got == [
        {
            "path": "b/2.png",
            "sha256": "s2",
            "given_class": "b",
            "suggested_class": "a",
            "label_quality": "0.01",
            "source_version": "12",
            "source_run": "run-x",
        }
    ]
    assert exclusion_rows(issues, [], "12", "run-x")[0]["sha256"] == ""  # unknown content: split never matches


def _dead_mlflow_port() -> int:
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _params(tmp_path: Path, exclude: bool) -> Path:
    fp = tmp_path / "params.yaml"
    fp.write_text(
        yaml.safe_dump(
            {"data": {"landing_uri": "s3://x/", "exclude_label_issues": exclude}, "registry": {"model_name": "nobody"}}
        ),
        encoding="utf-8",
    )
    return fp


def test_flag_off_writes_an_empty_file_without_asking_mlflow(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_dead_mlflow_port()}"}
    out = run_cli(
        [
            "pipeline",
            "label_exclusions",
            "--params",
            str(_params(tmp_path, False)),
            "--out",
            str(tmp_path / "excl.csv"),
        ],
        env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "excl.csv").read_text(encoding="utf-8").strip() == ",".join(FIELDS)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "enabled": False,
        "champion_version": None,
        "n_excluded": 0,
    }


def test_flag_on_and_mlflow_unreachable_fails_the_stage(tmp_path):
    """Never "no exclusions" because the registry could not be read: a transient error, retried, no file."""
    env = {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_dead_mlflow_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    out = run_cli(
        ["pipeline", "label_exclusions", "--params", str(_params(tmp_path, True)), "--out", str(tmp_path / "excl.csv")],
        env,
        timeout=180,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error (transient): cannot reach the MLflow server")
    assert not (tmp_path / "excl.csv").exists()


def test_model_card_says_how_many_left_and_from_which_version():
    from pipeline.stages.model_card import exclusions_card

    counts = {
        "listed": 9,
        "dropped_train": 6,
        "dropped_val": 2,
        "kept_in_test": 0,
        "not_matched": 1,
        "source_versions": ["4"],
    }
    card = "\n".join(exclusions_card(True, counts, "m"))
    assert "8 images left this training (6 train, 2 val)" in card and "m v4" in card
    assert "1 no longer in the data" in card
    assert "false: no image was excluded" in "\n".join(exclusions_card(False, {}, "m"))
    assert "no image was excluded" in "\n".join(exclusions_card(True, {"listed": 0}, "m"))
