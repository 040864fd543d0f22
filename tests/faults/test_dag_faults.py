"""Faults injected into real training DAG runs (`airflow dags test`, real S3, MLflow and DVC).

The tests run in file order and share one workspace, landing prefix and registered model:
1. the member being trained is SIGKILLed mid-epoch (and, while its stage holds the workspace, a workstation
   `dvc repro` is tried there): the retried task resumes from the checkpoint; DVC refuses the second repro
   and names the stage holding the workspace;
2. S3 is stopped as soon as the ingest stage starts: retried with backoff, then a clean failure; the champion
   is untouched;
3. S3 back, the same DAG rerun completes with every object exactly once; MLflow is stopped the moment the new
   version appears in the registry: no alias moves and nothing is left half-registered; the retry finishes it;
4. MLflow is stopped at exactly register's champion lookup (a proxy in front of it trips on that request and
   holds every later one until the server is back): the attempt fails as transient instead of reading the
   outage as "no champion"; nothing is promoted between attempts; the retry compares with the real champion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from pipeline.core.checkpoints import sha256_file
from tests.conftest import ROOT
from tests.integration.helpers import TINTS, png_bytes, wait_for

pytestmark = pytest.mark.faults

MODEL = "faults-defect-classifier"
PREFIX = "faults/"
EPOCHS = 30


@pytest.fixture(scope="module")
def faults(stack, stack_env, tmp_path_factory):
    """Landing data, a workspace of its own and the env for the DAG runs of this module."""
    from pipeline.adapters import storage

    s3 = storage.client()
    for c_i, (cls, tint) in enumerate(TINTS.items()):
        for i in range(20):
            s3.put_object(
                Bucket="landing", Key=f"{PREFIX}{cls}/{i:03d}.png", Body=png_bytes(c_i * 1000 + i, size=64, tint=tint)
            )
    ws = tmp_path_factory.mktemp("faults-ws")
    env = {
        **stack_env,
        "PIPELINE_WORKSPACE": str(ws),
        "PIPELINE_RETRY_DELAY_S": "2",
        # fail fast while a server is down; Airflow's retries do the waiting
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }
    conf = {
        "landing_uri": f"s3://landing/{PREFIX}",
        "profile": "test",
        "set": [
            f"registry.model_name={MODEL}",
            f"train.epochs={EPOCHS}",
            "train.patience=1000",
            "model.img_size=64",
            "train.amp=none",
            # the backbones are not under test here: one epoch each
            "backbones.test_efficientnet.epochs=1",
            "backbones.test_resnet.epochs=1",
        ],
    }
    return {"ws": ws, "env": env, "conf": conf, "s3": s3}


class DagRun:
    """`python -m devstack run-dag defect_training` in the background, its console output in a file."""

    def __init__(self, env: dict, conf: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devstack", "run-dag", "defect_training", "--conf", json.dumps(conf)],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: int = 1200) -> int:
        return self.proc.wait(timeout=timeout)

    def full_log(self) -> str:
        """The whole `airflow dags test` output (run-dag names its file on its first line)."""
        first = self.log.read_text().splitlines()[0]
        return Path(first.split("full log: ")[1].rstrip(")")).read_text()


def _stage_procs(stage: str, ws: Path) -> list[psutil.Process]:
    """This test's stage processes: DVC runs a stage's command in the workspace, so the cwd tells ours apart from
    any other pipeline on the machine (a demo, a second test session), which must never be killed."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = p.info["cmdline"] or []
        if (
            len(cmd) > 3
            and cmd[1:4] == ["-m", "pipeline", stage]
            and "python" in Path(cmd[0]).name
            and p.info["cwd"]
            and Path(p.info["cwd"]).resolve() == Path(ws).resolve()
        ):
            found.append(p)
    return found


def _ckpt_epoch(fp: Path) -> int:
    try:
        return torch.load(fp, map_location="cpu", weights_only=True)["state"]["epoch"]
    except Exception:
        return 0


def _versions() -> list:
    from mlflow import MlflowClient

    return MlflowClient().search_model_versions(f"name = '{MODEL}'")


def _alias(name: str) -> str | None:
    from mlflow import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(MODEL, name).version
    except Exception:
        return None


def test_sigkilled_training_resumes_on_retry_and_a_second_repro_is_refused(faults, tmp_path):
    ws, env = faults["ws"], faults["env"]
    run = DagRun(env, faults["conf"], tmp_path / "run.log")
    ckpt = ws / ".cache" / "checkpoints" / "member_0.pt"
    wait_for(lambda: ckpt.exists() and _ckpt_epoch(ckpt) >= 1, 900, "member_0's first epoch checkpoint", interval=0.1)
    victim = wait_for(
        lambda: _stage_procs("train", ws) and [p for p in _stage_procs("train", ws) if "--member" in p.cmdline()],
        30,
        "the train process",
        interval=0.1,
    )

    # A workstation `dvc repro` in the workspace while the Airflow task's stage holds it.
    lock_before = (ws / "dvc.lock").read_text()
    other = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "repro"],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    said = other.stdout + other.stderr
    assert other.returncode != 0
    # DVC's per-path read/write locks: the path, the process and the stage that holds it.
    assert "is busy, it is being blocked by" in said and "dvc repro --single-item train@0" in said, said
    assert (ws / "dvc.lock").read_text() == lock_before

    assert _ckpt_epoch(ckpt) < EPOCHS, "training ended before the kill; the test needs a slower member"
    for p in victim:
        p.kill()  # SIGKILL, mid-epoch: the epoch after the checkpoint is under way
    killed_at = _ckpt_epoch(ckpt)
    assert run.wait() == 0, run.log.read_text()[-4000:]
    log = run.full_log()
    assert f"resuming member_0 from epoch {killed_at}" in log
    meta = json.loads((ws / "models" / "member_0" / "meta.json").read_text())
    assert meta["epochs_run"] == EPOCHS and not ckpt.exists()
    history = json.loads((ws / "models" / "member_0" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))  # no epoch lost or repeated
    # dvc.lock is whole and agrees with the workspace: the stages DVC recorded are up to date.
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert {"train@0", "evaluate", "register"} <= set(lock["stages"])
    status = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status", "train@0", "evaluate"],
        cwd=ws,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    assert _alias("champion") is not None


def test_s3_outage_during_ingest_fails_cleanly_after_retries_and_leaves_the_champion(faults, stack, tmp_path):
    from devstack import services

    s3, ws = faults["s3"], faults["ws"]
    for c_i, (cls, tint) in enumerate(TINTS.items()):  # a new arrival, so the rerun has something to ingest
        for i in range(4):
            s3.put_object(
                Bucket="landing",
                Key=f"{PREFIX}{cls}/new_{i:03d}.png",
                Body=png_bytes(c_i * 1000 + 500 + i, size=64, tint=tint),
            )
    champion, n_versions = _alias("champion"), len(_versions())
    manifest_before = (ws / "data" / "manifest.csv").read_text()
    run = DagRun(faults["env"], faults["conf"], tmp_path / "run.log")
    try:
        wait_for(lambda: _stage_procs("ingest", ws), 600, "the ingest stage", interval=0.05)
        services.stop(stack, "seaweedfs")
        assert run.wait() != 0
    finally:
        services.start_s3(stack)
    log = run.full_log()
    attempts = log.count("dvc repro --single-item ingest")
    assert attempts == 3, f"ingest ran {attempts} times, expected 1 + 2 retries"
    assert "cannot reach the S3 endpoint" in log
    assert "Marking task as UP_FOR_RETRY" in log or "up_for_retry" in log.lower()
    assert "validate" not in {line.split("task_id=")[-1][:8] for line in log.splitlines() if "task_id=" in line}
    assert _alias("champion") == champion and len(_versions()) == n_versions
    assert (ws / "data" / "manifest.csv").read_text() == manifest_before  # nothing half-written
    assert not list((ws / "data" / "raw").rglob("*.part"))


def test_rerun_completes_nothing_lost_and_mlflow_outage_during_register_leaves_no_half_version(faults, stack, tmp_path):
    from mlflow import MlflowClient

    from devstack import services
    from pipeline.core.io import read_csv

    s3, ws = faults["s3"], faults["ws"]
    champion, before = _alias("champion"), {v.version for v in _versions()}
    env = {**faults["env"], "PIPELINE_RETRY_DELAY_S": "40"}  # time to check the registry between attempts
    run = DagRun(env, faults["conf"], tmp_path / "run.log")
    try:
        new = wait_for(
            lambda: [v for v in _versions() if v.version not in before], 1200, "the new model version", interval=0.2
        )
        services.stop(stack, "mlflow")
        wait_for(lambda: not _stage_procs("register", ws), 120, "the register attempt to end", interval=0.5)
    finally:
        services.start_mlflow(stack)
    # Between the attempts: the champion has not moved, and the new version carries no decision yet.
    assert _alias("champion") == champion
    half = MlflowClient().get_model_version(MODEL, new[0].version)
    assert "gate" not in half.tags and half.tags["candidate_id"]
    assert run.wait() == 0, run.log.read_text()[-4000:]
    assert run.full_log().count("dvc repro --single-item register") == 2

    after = {v.version: v for v in _versions()}
    assert set(after) - before == {new[0].version}, "exactly one new version"
    for v in after.values():
        assert v.tags.get("gate") in ("promoted", "rejected"), (v.version, v.tags)  # none left half-registered
    decision = json.loads((ws / "registry" / "decision.json").read_text())
    assert decision["model_version"] == new[0].version
    expected_champion = new[0].version if decision["gate"] == "promoted" else champion
    assert _alias("champion") == expected_champion

    # Every landed object is in the manifest exactly once, byte for byte, and nothing else is in data/raw.
    landed = {o["Key"][len(PREFIX) :] for o in s3.list_objects_v2(Bucket="landing", Prefix=PREFIX)["Contents"]}
    rows = read_csv(ws / "data" / "manifest.csv")
    assert sorted(r["path"] for r in rows) == sorted(landed) and len(rows) == 72
    raw = ws / "data" / "raw"
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()) == sorted(landed)
    assert all(sha256_file(raw / r["path"]) == r["sha256"] for r in rows)


def _is_champion_lookup(method: str, path: str) -> bool:
    """MLflow's GetModelVersionByAlias for this module's model and alias ``champion``."""
    return (
        method == "GET" and "/registered-models/alias" in path and "alias=champion" in path and f"name={MODEL}" in path
    )


def test_mlflow_stopped_at_the_champion_lookup_fails_closed_and_the_retry_compares_with_the_champion(
    faults, stack, tmp_path
):
    from mlflow import MlflowClient

    from devstack import services
    from devstack.fault_proxy import FaultProxy

    quick = [*faults["conf"]["set"], "train.epochs=1"]
    if _alias("champion") is None:  # run on its own (-k): the earlier tests leave a champion; make one
        assert DagRun(faults["env"], {**faults["conf"], "set": quick}, tmp_path / "first.log").wait() == 0
    champion, before = _alias("champion"), {v.version for v in _versions()}
    attempt = []  # the register process that made the lookup

    def stop_mlflow() -> None:
        attempt.extend(_stage_procs("register", faults["ws"]))
        services.stop(stack, "mlflow")

    proxy = FaultProxy(stack.mlflow_url, _is_champion_lookup, stop_mlflow).start()
    # Held requests wait for the server (up to minutes): the client must not time out on them first.
    env = {**faults["env"], "MLFLOW_TRACKING_URI": proxy.url, "MLFLOW_HTTP_REQUEST_TIMEOUT": "900"}
    # A new candidate, so that register gets to the lookup: another learning rate changes the weights from the
    # first step (same files would be "already registered"); two epochs keep it quick. Nothing new landed, so
    # the data stages skip.
    sets = [*faults["conf"]["set"], "train.epochs=2", "train.lr=0.0011"]
    run = DagRun(env, {**faults["conf"], "set": sets}, tmp_path / "run.log")
    try:
        wait_for(
            lambda: proxy.tripped.is_set() or run.proc.poll() is not None, 1200, "the champion lookup", interval=0.5
        )
        assert proxy.tripped.is_set(), "the DAG run ended before the champion lookup: " + run.log.read_text()[-3000:]
        # Fail-closed code ends the attempt on the failed lookup; fail-open code reads "no champion" and goes on
        # (its next requests wait in the proxy), so its process is still alive here.
        _, still_running = psutil.wait_procs(attempt, timeout=120)
        services.start_mlflow(stack)
        assert _alias("champion") == champion  # nothing was promoted during the outage
        new = [v for v in _versions() if v.version not in before]
        assert len(new) == 1 and "gate" not in new[0].tags and new[0].tags["candidate_id"], new
    finally:
        services.start_mlflow(stack)
        proxy.release()  # the retry (and, in fail-open code, the first attempt) goes on against a live server
    code = run.wait()
    proxy.close()
    decision = json.loads((faults["ws"] / "registry" / "decision.json").read_text())
    assert not still_running, f"register went on after the failed champion lookup: {decision['reason']}"
    assert code == 0, run.log.read_text()[-4000:]
    log = run.full_log()
    assert "cannot read alias champion of faults-defect-classifier" in log
    assert log.count("dvc repro --single-item register") == 2
    assert proxy.refused and all(_is_champion_lookup(*r.split(" ", 1)) for r in proxy.refused)

    after = {v.version: v for v in _versions()}
    assert set(after) - before == {new[0].version}, "exactly one new version"
    assert all(v.tags.get("gate") in ("promoted", "rejected") for v in after.values())
    done = MlflowClient().get_model_version(MODEL, new[0].version)
    # the retry compared with the real champion, through both pyfuncs, with the bootstrap's numbers recorded
    assert done.tags["champion_version_at_gate"] == champion and done.tags["gate_p_improve"] != ""
    assert not decision["reason"].startswith("no champion")
    assert _alias("champion") == (new[0].version if decision["gate"] == "promoted" else champion)
