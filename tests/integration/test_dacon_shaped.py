"""The reference path's data on the real stack: DACON's 19 Korean classes (one with a comma), tiny classes at their
real sizes, NFD folder names, RGB/RGBA PNGs and JPEGs, through the training DAG to a registered model and a
DACON submission (the test profile's tiny model: this proves the plumbing, not the accuracy)."""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from devstack.dacon_fixture import DACON_COUNTS, class_counts, upload_train, write_dacon_tree
from tests.conftest import run_cli

pytestmark = pytest.mark.integration

MODEL = "dacon-shaped-classifier"
PREFIX = "dacon-shaped/train/"
# Where a person can look at what the run produced (the confusion matrix, the model card) after the test.
KEEP = Path("/tmp/dacon-shaped-run")


@pytest.fixture(scope="module")
def dacon_run(stack, stack_env, tmp_path_factory):
    from pipeline.adapters import storage

    upload_train(storage.client(), "landing", PREFIX)
    ws = tmp_path_factory.mktemp("dacon-ws")
    conf = json.dumps(
        {
            "landing_uri": f"s3://landing/{PREFIX}",
            "profile": "test",
            "set": [f"registry.model_name={MODEL}", 'train.flip_policy={"창틀,문틀수정": "v"}'],
        }
    )
    env = {**stack_env, "PIPELINE_WORKSPACE": str(ws)}
    out = run_cli(["devstack", "run-dag", "defect_training", "--conf", conf], env)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    shutil.rmtree(KEEP, ignore_errors=True)
    shutil.copytree(ws / "reports", KEEP / "reports")
    return ws


def test_dag_registers_a_model_of_the_19_korean_classes(dacon_run, stack):
    from mlflow import MlflowClient

    ws = dacon_run
    names = sorted(DACON_COUNTS)
    validation = json.loads((ws / "reports" / "validation.json").read_text(encoding="utf-8"))
    assert validation["class_counts"] == class_counts()  # NFD folders counted under their NFC names
    assert all(unicodedata.is_normalized("NFC", c) for c in validation["class_counts"])
    split = json.loads((ws / "reports" / "split.json").read_text(encoding="utf-8"))
    too_small = {c for c, n in class_counts().items() if n < split["min_class_for_split"]}
    assert "반점" in too_small and set(split["train_only_classes"]) == too_small
    meta = json.loads((ws / "models" / "member_0" / "meta.json").read_text(encoding="utf-8"))
    assert meta["class_names"] == names and meta["flips"]["창틀,문틀수정"] == "v"
    decision = json.loads((ws / "registry" / "decision.json").read_text(encoding="utf-8"))
    assert decision["gate"] == "promoted" and decision["model_name"] == MODEL
    version = MlflowClient().get_model_version(MODEL, decision["model_version"])
    for name in names:
        assert f"| {name} |" in version.description or f"{name} {DACON_COUNTS[name]}" in version.description, name
    assert set(json.loads(version.tags["per_class_f1"])) <= set(names)
    (KEEP / "model_card.md").write_text(version.description, encoding="utf-8")


def test_submission_answers_every_test_id_with_an_nfc_korean_label(dacon_run, stack, stack_env, tmp_path):
    write_dacon_tree(tmp_path / "dacon", test_images=12)
    out_fp = tmp_path / "submission.csv"
    out = run_cli(
        [
            "pipeline",
            "submission",
            "--model",
            f"models:/{MODEL}@champion",
            "--dacon-dir",
            str(tmp_path / "dacon"),
            "--out",
            str(out_fp),
        ],
        stack_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(out_fp, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == [f"TEST_{i:03d}" for i in range(12)]
    assert all(r["label"] in DACON_COUNTS and unicodedata.is_normalized("NFC", r["label"]) for r in rows)
    shutil.copy(out_fp, KEEP / "submission.csv")
