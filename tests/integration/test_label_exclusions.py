"""Stage ``label_exclusions`` against the real MLflow server of the private stack, with a real logged report.

The champion here is a registered version whose run holds ``reports/label_issues.csv`` and ``split.csv`` logged the
way ``register`` logs them (``reports/`` as a folder, the split file at the root); no training is needed to read
them. The training DAG runs the stage with the flag off: tests/integration/test_end_to_end.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.core.io import read_csv, write_csv
from pipeline.stages.label_exclusions import FIELDS
from pipeline.stages.label_issues import FIELDS as ISSUE_FIELDS
from pipeline.stages.split import SPLIT_FIELDS
from tests.conftest import run_cli

pytestmark = pytest.mark.integration

ISSUES = [
    {
        "rank": 1,
        "path": "mold/b.png",
        "split": "train",
        "given_class": "mold",
        "suggested_class": "crack",
        "label_quality": 0.01,
        "issue": True,
        "p_given": 0.01,
        "source": "oob:member_1",
    },
    {
        "rank": 2,
        "path": "crack/a.png",
        "split": "val",
        "given_class": "crack",
        "suggested_class": "stain",
        "label_quality": 0.05,
        "issue": True,
        "p_given": 0.05,
        "source": "val:all_members",
    },
    {
        "rank": 3,
        "path": "crack/c.png",
        "split": "train",
        "given_class": "crack",
        "suggested_class": "crack",
        "label_quality": 0.97,
        "issue": False,
        "p_given": 0.97,
        "source": "oob:member_0",
    },
]
SPLIT = [
    {"path": p, "class_name": p.split("/")[0], "sha256": f"{i:064x}", "split": s, "group": f"{i:012x}"}
    for i, (p, s) in enumerate(
        [("crack/a.png", "val"), ("mold/b.png", "train"), ("crack/c.png", "train"), ("stain/d.png", "test")], 1
    )
]


def _register_champion(name: str, tmp: Path, with_report: bool = True, with_split: bool = True) -> str:
    """A run holding the report and split as register logs them, registered as ``name`` and made champion."""
    import mlflow
    from mlflow import MlflowClient

    reports = tmp / "reports"
    reports.mkdir(parents=True)
    if with_report:
        write_csv(reports / "label_issues.csv", ISSUES, ISSUE_FIELDS)
    (reports / "label_issues.json").write_text("{}\n")
    write_csv(tmp / "split.csv", SPLIT, SPLIT_FIELDS)
    mlflow.set_experiment("label-exclusions-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(reports), artifact_path="reports")
        if with_split:
            mlflow.log_artifact(str(tmp / "split.csv"))
        mlflow.log_text("placeholder", "bag/README.txt")
    client = MlflowClient()
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/bag", run_id=run.info.run_id).version
    client.set_registered_model_alias(name, "champion", version)
    return str(version)


def _stage(tmp: Path, name: str, env: dict) -> tuple[object, list[dict]]:
    params = tmp / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"data": {"landing_uri": "s3://x/", "exclude_label_issues": True}, "registry": {"model_name": name}}
        ),
        encoding="utf-8",
    )
    out = run_cli(
        ["pipeline", "label_exclusions", "--params", str(params), "--out", str(tmp / "excl.csv")], env, timeout=300
    )
    return out, read_csv(tmp / "excl.csv")


def test_the_champions_flagged_images_are_listed_with_their_content_hash(stack, stack_env, tmp_path):
    version = _register_champion("excl-test-champion", tmp_path / "logged")
    out, rows = _stage(tmp_path, "excl-test-champion", stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary == {"enabled": True, "champion_version": version, "n_excluded": 1}
    sha = {r["path"]: r["sha256"] for r in SPLIT}
    # the flagged val image (crack/a.png) stays: val is the yardstick
    assert [(r["path"], r["sha256"], r["given_class"], r["suggested_class"], r["source_version"]) for r in rows] == [
        ("mold/b.png", sha["mold/b.png"], "mold", "crack", version)
    ]
    assert list(rows[0]) == FIELDS


def test_no_champion_yet_means_nothing_to_exclude(stack, stack_env, tmp_path):
    out, rows = _stage(tmp_path, "excl-test-never-registered", stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert rows == [] and "has no champion yet; nothing excluded" in out.stderr
    assert (tmp_path / "excl.csv").read_text(encoding="utf-8").strip() == ",".join(FIELDS)


def test_a_champion_without_a_report_excludes_nothing_and_says_so(stack, stack_env, tmp_path):
    _register_champion("excl-test-old-champion", tmp_path / "logged", with_report=False)
    out, rows = _stage(tmp_path, "excl-test-old-champion", stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert rows == [] and "has no reports/label_issues.csv" in out.stderr


def test_a_report_that_cannot_be_downloaded_fails_the_stage(stack, stack_env, tmp_path):
    """The champion's run lacks its split.csv (deleted artifacts): fail, retried as transient, and write no list
    rather than exclude nothing (or exclude images we cannot identify by content)."""
    _register_champion("excl-test-broken-champion", tmp_path / "logged", with_split=False)
    out, rows = _stage(tmp_path, "excl-test-broken-champion", stack_env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error (transient): cannot download split.csv of excl-test-broken-champion v1")
    )
    assert not (tmp_path / "excl.csv").exists() and rows == []
