"""The walking skeleton for real: tiny images in SeaweedFS → `airflow dags test` → a champion in MLflow."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run_cli
from tests.integration.helpers import MODEL, TINTS, png_bytes

pytestmark = pytest.mark.integration


def test_dag_registers_a_champion_with_lineage_tags(trained, stack):
    from mlflow import MlflowClient

    client = MlflowClient()
    champ = client.get_model_version_by_alias(MODEL, "champion")
    decision = json.loads((trained / "registry" / "decision.json").read_text())
    validation = json.loads((trained / "reports" / "validation.json").read_text())
    assert decision["gate"] == "promoted" and decision["model_version"] == champ.version
    assert champ.tags["gate"] == "promoted"
    assert champ.tags["data_fingerprint"] == validation["fingerprint"]
    import yaml

    lock = yaml.safe_load((trained / "dvc.lock").read_text())
    raw_md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert champ.tags["dvc_data_md5"] == raw_md5 and champ.tags["params_hash"]
    assert champ.tags["git_commit"] != ""
    assert f"{float(champ.tags['weighted_f1']):.4f}" == f"{decision['weighted_f1']:.4f}"
    assert "Gate:" in champ.description and "stain" in champ.description
    assert validation["class_counts"] == {"crack": 8, "mold": 8, "stain": 8}


def test_champion_pyfunc_answers_the_contract(trained, stack):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    frame = pd.DataFrame({"image": [base64.b64encode(png_bytes(5, tint=TINTS["mold"])).decode(),
                                    base64.b64encode(b"not an image").decode()]})
    out = model.predict(frame)
    assert list(out.columns[:2]) == ["label", "confidence"] and len(out) == 2
    assert out.loc[0, "label"] in TINTS and 0 < out.loc[0, "confidence"] <= 1
    assert out.loc[1, "label"] == "" and "cannot decode" in out.loc[1, "error"]


def test_register_again_creates_no_second_version(trained, stack, stack_env):
    from mlflow import MlflowClient

    before = len(MlflowClient().search_model_versions(f"name = '{MODEL}'"))
    out = run_cli(["pipeline", "register", "--params", "params.yaml"], stack_env, cwd=trained)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(MlflowClient().search_model_versions(f"name = '{MODEL}'")) == before


def test_workspace_is_up_to_date_for_dvc_after_the_dag(trained, stack_env):
    out = run_cli(["dvc", "status"], stack_env, cwd=trained)
    assert out.returncode == 0, out.stderr
    changed = [ln.strip() for ln in out.stdout.splitlines() if ln.strip().endswith(":") and not ln.startswith("\t")]
    # ingest always re-checks the bucket; every other stage must be up to date.
    assert changed == ["ingest:"], out.stdout


def test_mlflow_models_serve_answers_a_real_image(trained, stack, stack_env, tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = {**__import__("os").environ, **stack_env}
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=open(tmp_path / "serve.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(png_bytes(11, tint=TINTS["crack"])).decode()]]}}).encode()
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and answer is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(2)
        assert answer is not None, "server did not answer within 180 s"
        row = answer["predictions"][0]
        assert row["label"] in TINTS and 0 < row["confidence"] <= 1
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_worse_candidate_is_rejected_and_champion_untouched_then_rollback(trained, stack, stack_env):
    from mlflow import MlflowClient

    client = MlflowClient()
    champion_before = client.get_model_version_by_alias(MODEL, "champion").version
    # A different model (another learning rate) that must beat the champion by 1.0 weighted F1: impossible.
    conf = json.dumps({"landing_uri": "s3://landing/tiny/", "profile": "test",
                       "set": ["registry.min_delta=1.0", "train.lr=0.003"]})
    out = run_cli(["devstack", "run-dag", "defect_training", "--conf", conf], stack_env)
    assert out.returncode == 0, out.stdout[-4000:]
    decision = json.loads((trained / "registry" / "decision.json").read_text())
    assert decision["gate"] == "rejected" and "min_delta 1.0" in decision["reason"]
    assert decision["champion_f1_rescored"] is not None  # the champion was re-scored, not read from a tag
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion_before
    assert client.get_model_version_by_alias(MODEL, "challenger").version == decision["model_version"]

    audit = run_cli(["pipeline", "audit", "--model", MODEL, champion_before, decision["model_version"]], stack_env)
    assert audit.returncode == 0 and "param train.lr" in audit.stdout and "tag gate" in audit.stdout

    # Promote the challenger by hand, then roll back to the old champion with a recorded reason.
    client.set_registered_model_alias(MODEL, "champion", decision["model_version"])
    back = run_cli(["pipeline", "rollback", "--model", MODEL, "--to", champion_before, "--reason", "test"],
                   stack_env)
    assert back.returncode == 0, back.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion_before
    assert client.get_model_version_by_alias(MODEL, "previous_champion").version == decision["model_version"]
    assert client.get_model_version(MODEL, champion_before).tags["rollback_reason"] == "test"


def test_dvc_pull_restores_data_and_models_from_the_s3_remote(trained, stack_env):
    import shutil

    raw_files = sorted(p.relative_to(trained) for p in (trained / "data" / "raw").rglob("*") if p.is_file())
    model_bytes = (trained / "models" / "member_0" / "model.pt").read_bytes()
    for path in (".dvc/cache", "data/raw", "models"):
        shutil.rmtree(trained / path)
    out = run_cli(["dvc", "pull"], stack_env, cwd=trained)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.relative_to(trained) for p in (trained / "data" / "raw").rglob("*") if p.is_file()) == raw_files
    assert (trained / "models" / "member_0" / "model.pt").read_bytes() == model_bytes
