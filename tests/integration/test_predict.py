"""Batch prediction against the real registry and S3: folder/S3 → CSV, the DACON submission, the batch DAG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.integration.helpers import MODEL, TINTS, png_bytes

pytestmark = pytest.mark.integration
CHAMPION = f"models:/{MODEL}@champion"


def _read(fp: Path) -> list[dict]:
    with open(fp, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _photos(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, cls in enumerate(TINTS):
        (folder / f"{cls}_{i}.png").write_bytes(png_bytes(500 + i, tint=TINTS[cls]))
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.png").write_bytes(png_bytes(600, tint=TINTS["mold"]))
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes(png_bytes(601)[:60])


def test_predict_folder_gives_a_row_per_file_and_errors_for_bad_ones(trained, stack, stack_env, tmp_path):
    _photos(tmp_path / "in")
    out = run_cli(
        [
            "pipeline",
            "predict",
            "--model",
            CHAMPION,
            "--input",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "p.csv"),
            "--tta",
        ],
        stack_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["id"]: r for r in _read(tmp_path / "p.csv")}
    assert set(rows) == {"crack_0.png", "mold_1.png", "stain_2.png", "sub/nested.png", "notes.txt", "truncated.png"}
    for bad in ("notes.txt", "truncated.png"):
        assert rows[bad]["label"] == "" and "cannot decode" in rows[bad]["error"]
    for good in ("crack_0.png", "mold_1.png", "stain_2.png", "sub/nested.png"):
        r = rows[good]
        probs = [float(r[f"prob_{c}"]) for c in sorted(TINTS)]
        assert r["error"] == "" and r["label"] in TINTS and abs(sum(probs) - 1) < 1e-4
        assert float(r["confidence"]) == pytest.approx(max(probs), abs=1e-6)
    assert json.loads(out.stdout.strip().splitlines()[-1])["errors"] == 2


def test_predict_s3_prefix_and_local_models_folder_agree(trained, stack, stack_env, tmp_path, s3):
    for i, cls in enumerate(TINTS):
        s3.put_object(Bucket="landing", Key=f"adhoc/{cls}.png", Body=png_bytes(700 + i, tint=TINTS[cls]))
    a = run_cli(
        [
            "pipeline",
            "predict",
            "--model",
            str(trained / "models"),
            "--input",
            "s3://landing/adhoc/",
            "--out",
            str(tmp_path / "a.csv"),
        ],
        stack_env,
    )
    assert a.returncode == 0, a.stderr[-3000:]
    rows = _read(tmp_path / "a.csv")
    assert [r["id"] for r in rows] == ["crack.png", "mold.png", "stain.png"]
    assert all(r["label"] in TINTS and r["error"] == "" for r in rows)


def test_predict_empty_prefix_and_unknown_model_say_so(trained, stack, stack_env, tmp_path):
    out = run_cli(
        [
            "pipeline",
            "predict",
            "--model",
            CHAMPION,
            "--input",
            "s3://landing/nothing-here/",
            "--out",
            str(tmp_path / "x.csv"),
        ],
        stack_env,
    )
    assert out.returncode == 2 and "no files to classify under s3://landing/nothing-here/" in out.stderr
    out = run_cli(
        [
            "pipeline",
            "predict",
            "--model",
            "models:/no-such-model@champion",
            "--input",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.csv"),
        ],
        stack_env,
    )
    assert out.returncode == 2 and "models:/no-such-model@champion not found" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "x.csv").exists()


def _dacon_fixture(root: Path, n: int = 792) -> None:
    (root / "test").mkdir(parents=True)
    ids = [f"TEST_{i:03d}" for i in range(n)]
    tints = list(TINTS.values())
    for i, id_ in enumerate(ids):
        (root / "test" / f"{id_}.png").write_bytes(png_bytes(10_000 + i, size=32, tint=tints[i % 3]))
    # DACON's shape: test.csv lists id,img_path; the sample submission has the same ids in the same order.
    (root / "test.csv").write_text("id,img_path\n" + "".join(f"{i},./test/{i}.png\n" for i in ids))
    (root / "sample_submission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in ids))


def test_submission_matches_the_sample_exactly(trained, stack, stack_env, tmp_path):
    _dacon_fixture(tmp_path / "dacon")
    out = run_cli(
        [
            "pipeline",
            "submission",
            "--model",
            CHAMPION,
            "--dacon-dir",
            str(tmp_path / "dacon"),
            "--out",
            str(tmp_path / "submission.csv"),
        ],
        stack_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sub = (tmp_path / "submission.csv").read_text().splitlines()
    sample = (tmp_path / "dacon" / "sample_submission.csv").read_text().splitlines()
    assert sub[0] == "id,label" and len(sub) == 793
    assert [ln.split(",")[0] for ln in sub] == [ln.split(",")[0] for ln in sample]
    labels = [ln.split(",", 1)[1] for ln in sub[1:]]
    assert set(labels) <= set(TINTS)
    # Each id carries the label `predict` gives its own image file: rows are in test.csv order, not shuffled.
    pred = run_cli(
        [
            "pipeline",
            "predict",
            "--model",
            CHAMPION,
            "--input",
            str(tmp_path / "dacon" / "test"),
            "--out",
            str(tmp_path / "p.csv"),
        ],
        stack_env,
    )
    assert pred.returncode == 0, pred.stderr[-3000:]
    by_file = {r["id"].removesuffix(".png"): r["label"] for r in _read(tmp_path / "p.csv")}
    assert labels == [by_file[ln.split(",")[0]] for ln in sub[1:]]


def test_submission_refuses_mismatched_ids_and_missing_images(trained, stack, stack_env, tmp_path):
    root = tmp_path / "dacon"
    _dacon_fixture(root, n=5)
    (root / "sample_submission.csv").write_text(
        "id,label\nTEST_000,0\nTEST_002,0\nTEST_001,0\nTEST_003,0\nTEST_004,0\n"
    )
    out = run_cli(
        ["pipeline", "submission", "--model", CHAMPION, "--dacon-dir", str(root), "--out", str(tmp_path / "s.csv")],
        stack_env,
    )
    assert out.returncode == 2 and "disagree at row 3" in out.stderr, out.stderr[-2000:]
    _dacon_fixture(tmp_path / "d2", n=5)
    (tmp_path / "d2" / "test" / "TEST_003.png").unlink()
    out = run_cli(
        [
            "pipeline",
            "submission",
            "--model",
            CHAMPION,
            "--dacon-dir",
            str(tmp_path / "d2"),
            "--out",
            str(tmp_path / "s.csv"),
        ],
        stack_env,
    )
    assert out.returncode == 2 and "TEST_003" in out.stderr and not (tmp_path / "s.csv").exists()


def _keys(s3, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="landing", Prefix=prefix).get("Contents", []))


def test_batch_dag_classifies_new_photos_once_with_the_champion_version(trained, stack, stack_env, s3):
    from mlflow import MlflowClient

    for i, cls in enumerate(TINTS):
        s3.put_object(Bucket="landing", Key=f"incoming/site-a/{cls}.png", Body=png_bytes(800 + i, tint=TINTS[cls]))
    s3.put_object(Bucket="landing", Key="incoming/site-a/broken.jpg", Body=b"\xff\xd8\xff\xe0 truncated")
    conf = json.dumps({"incoming_uri": "s3://landing/incoming/", "model_uri": CHAMPION, "settle_seconds": 1})
    out = run_cli(["devstack", "run-dag", "defect_batch_predict", "--conf", conf], stack_env)
    assert out.returncode == 0, out.stdout[-4000:]
    champion = MlflowClient().get_model_version_by_alias(MODEL, "champion").version
    keys = _keys(s3, "incoming/")
    sidecars = [k for k in keys if k.endswith(".prediction.json")]
    assert len(sidecars) == 4 and len([k for k in keys if "/_predictions/" in k]) == 1
    crack = json.loads(s3.get_object(Bucket="landing", Key="incoming/site-a/crack.png.prediction.json")["Body"].read())
    assert crack["model_version"] == champion and crack["model_name"] == MODEL and crack["label"] in TINTS
    broken = json.loads(
        s3.get_object(Bucket="landing", Key="incoming/site-a/broken.jpg.prediction.json")["Body"].read()
    )
    assert broken["label"] == "" and "cannot decode" in broken["error"]

    # Same photos again: no event, nothing rewritten (our own outputs do not count as new data).
    out = run_cli(["devstack", "run-dag", "defect_batch_predict", "--conf", conf], stack_env)
    assert out.returncode == 0, out.stdout[-4000:]
    assert _keys(s3, "incoming/") == keys

    # Two new photos: only they are classified.
    for i in range(2):
        s3.put_object(Bucket="landing", Key=f"incoming/site-b/{i}.png", Body=png_bytes(900 + i, tint=TINTS["mold"]))
    out = run_cli(["devstack", "run-dag", "defect_batch_predict", "--conf", conf], stack_env)
    assert out.returncode == 0, out.stdout[-4000:]
    after = _keys(s3, "incoming/")
    assert len([k for k in after if k.endswith(".prediction.json")]) == 6
    runs = [k for k in after if "/_predictions/" in k]
    assert len(runs) == 2
    newest = [k for k in runs if k not in keys][0]
    body = s3.get_object(Bucket="landing", Key=newest)["Body"].read().decode()
    assert sorted(r["id"] for r in csv.DictReader(body.splitlines())) == ["site-b/0.png", "site-b/1.png"]
