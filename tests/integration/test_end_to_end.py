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
    # A first champion: no comparison, so no interval; the gate's own numbers and the calibration are recorded.
    n_test = json.loads((trained / "metrics" / "eval.json").read_text())["n_test"]
    assert champ.tags["gate_n_test"] == str(n_test) == str(decision["gate_n_test"])
    assert champ.tags["gate_p_improve"] == "" and champ.tags["gate_delta_ci_low"] == ""
    assert float(champ.tags["calibration_temperature"]) > 0 and champ.tags["calibration_ece_test_before"] != ""
    assert "## Gate: candidate against champion" in champ.description and "## Calibration" in champ.description
    artifacts = {a.path for folder in ("gate", "calibration") for a in client.list_artifacts(champ.run_id, folder)}
    assert {"gate/comparison.png", "calibration/reliability.png", "calibration/calibration.json"} <= artifacts
    # The label_issues stage ran in the DAG: its ranking, counts and thumbnail grid are the version's artifacts, the
    # flagged count its tag and a section of its model card.
    issues = json.loads((trained / "reports" / "label_issues.json").read_text())
    reports = {a.path for a in client.list_artifacts(champ.run_id, "reports")}
    assert {"reports/label_issues.csv", "reports/label_issues.json", "reports/label_issues.png"} <= reports, reports
    assert champ.tags["label_issues_flagged"] == str(issues["n_flagged"])
    assert "## Label issues" in champ.description and f"{issues['n_scored']}" in champ.description
    assert issues["n_scored"] + issues["n_unscored"] == sum(validation["class_counts"].values()) - n_test
    # data.exclude_label_issues is off: the DAG's label_exclusions task wrote the header only (its md5 in the lock),
    # split dropped nothing, and the model card and a tag say so.
    assert (trained / "data" / "label_exclusions.csv").read_text(encoding="utf-8").count("\n") == 1
    assert [o["path"] for o in lock["stages"]["label_exclusions"]["outs"]] == ["data/label_exclusions.csv"]
    assert json.loads((trained / "reports" / "split.json").read_text())["excluded"]["listed"] == 0
    assert "## Label exclusions" in champ.description and "false: no image was excluded" in champ.description
    assert champ.tags["label_excluded"] == "0"


# The scoring-parity tolerance: the gate's weighted F1 (the registered pyfunc on base64 test images) and
# evaluate's (the image cache) must agree to the 6 decimals the tags keep; per image, the labels must be equal, and
# the package's probabilities (before calibration) and served confidence (after) must match evaluate's to float32
# rounding. Raw probabilities are compared too: a temperature that sharpens hard (the tiny data's val split is
# all right) pushes every confidence to 1 and would hide a preprocessing difference.
PARITY_F1_TOL = 1e-6
PARITY_PROB_TOL = 1e-5


def test_the_gate_scores_the_registered_package_like_evaluate_scores_the_files(trained, stack):
    import mlflow
    import numpy as np

    decision = json.loads((trained / "registry" / "decision.json").read_text())
    metrics = json.loads((trained / "metrics" / "eval.json").read_text())
    version = mlflow.MlflowClient().get_model_version(MODEL, decision["model_version"])
    # one scoring path: the gate scored the candidate through its own registered pyfunc
    assert "gate_candidate_wf1" in version.tags, "the candidate's registered package was never scored"
    assert abs(float(version.tags["gate_candidate_wf1"]) - metrics["weighted_f1"]) <= PARITY_F1_TOL

    # image by image: the registered package on the gate's frame against evaluate's code on the image cache
    from pipeline.adapters.serving import decode_rows
    from pipeline.core.calibration import temperature_scale
    from pipeline.core.data import load_split
    from pipeline.core.inference import BagPredictor
    from pipeline.stages.evaluate import split_arrays
    from pipeline.stages.register import test_frame

    frame, truth = test_frame(trained / "data" / "split.csv", trained / "data" / "raw")
    package = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version.version}")
    served = package.predict(frame)
    images, errors = decode_rows(frame["image"].tolist())  # the pyfunc's own decode, then its own resize
    package_probs = package.unwrap_python_model().predictor.predict_proba(images)
    bag = BagPredictor.from_dirs(sorted((trained / "models").glob("member_*")))
    arrays, _ = split_arrays(
        trained / "data" / "raw", load_split(trained / "data" / "split.csv"), "test", bag.sizes(), None
    )
    probs = bag.predict_proba_arrays(arrays)
    assert errors == [""] * len(truth)
    np.testing.assert_allclose(package_probs, probs, atol=PARITY_PROB_TOL)
    temperature = json.loads((trained / "reports" / "eval" / "calibration.json").read_text())["temperature"]
    expected = temperature_scale(probs, temperature).max(axis=1)
    assert served["label"].tolist() == [bag.class_names[k] for k in probs.argmax(axis=1)]
    np.testing.assert_allclose(served["confidence"].to_numpy(), expected, atol=PARITY_PROB_TOL)
    evaluated = (trained / "reports" / "eval" / "predictions.csv").read_text().splitlines()[1:]
    assert [line.split(",")[1] for line in evaluated] == served["label"].tolist()
    assert len(truth) == metrics["n_test"]


def test_champion_pyfunc_answers_the_contract(trained, stack):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    frame = pd.DataFrame(
        {
            "image": [
                base64.b64encode(png_bytes(5, tint=TINTS["mold"])).decode(),
                base64.b64encode(b"not an image").decode(),
            ]
        }
    )
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
    # ingest always re-checks the bucket and label_exclusions the registry; every other stage must be up to date.
    assert changed == ["ingest:", "label_exclusions:"], out.stdout
    assert out.stdout.count("always changed") == 2, out.stdout


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
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        body = json.dumps(
            {
                "dataframe_split": {
                    "columns": ["image"],
                    "data": [[base64.b64encode(png_bytes(11, tint=TINTS["crack"])).decode()]],
                }
            }
        ).encode()
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and answer is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
                )
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


def test_a_candidate_trained_with_a_crippled_recipe_is_rejected_then_rollback(trained, stack, stack_env):
    from mlflow import MlflowClient

    from tests.conftest import GOOD_TINY_RECIPE

    client = MlflowClient()
    champion_before = client.get_model_version_by_alias(MODEL, "champion").version
    # The champion's recipe with a learning rate of 1e-9: the weights never leave their random start. Default
    # gate settings (min_delta 0, confidence 0.9): the champion must win on the images, not by a tuned margin.
    conf = json.dumps(
        {"landing_uri": "s3://landing/tiny/", "profile": "test", "set": [*GOOD_TINY_RECIPE, "train.lr=1.0e-9"]}
    )
    out = run_cli(["devstack", "run-dag", "defect_training", "--conf", conf], stack_env)
    assert out.returncode == 0, out.stdout[-4000:]
    decision = json.loads((trained / "registry" / "decision.json").read_text())
    # really worse, on the same test images, through the same pyfunc scoring
    assert decision["champion_f1_rescored"] >= decision["gate_candidate_wf1"] + 0.3, decision
    assert decision["gate"] == "rejected" and decision["gate_p_improve"] < 0.9, decision
    assert "P(ΔwF1 > 0) = " in decision["reason"] and decision["gate_delta_wf1"] < 0
    assert decision["gate_n_test"] == json.loads((trained / "metrics" / "eval.json").read_text())["n_test"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion_before
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert challenger.version == decision["model_version"]
    assert challenger.tags["champion_version_at_gate"] == champion_before
    for key in ("gate_delta_wf1", "gate_delta_ci_low", "gate_delta_ci_high", "gate_p_improve", "gate_n_test"):
        assert challenger.tags[key] != "", key
    assert "| P(ΔwF1 > 0) |" in challenger.description and "bootstrap interval" in challenger.description

    audit = run_cli(["pipeline", "audit", "--model", MODEL, champion_before, decision["model_version"]], stack_env)
    assert audit.returncode == 0 and "param train.lr" in audit.stdout and "tag gate" in audit.stdout

    # Promote the challenger by hand, then roll back to the old champion with a recorded reason.
    client.set_registered_model_alias(MODEL, "champion", decision["model_version"])
    back = run_cli(["pipeline", "rollback", "--model", MODEL, "--to", champion_before, "--reason", "test"], stack_env)
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
