"""Shared fixtures. Integration tests start their own real stack on other ports (S3 17333, MLflow 25000)
under a temporary folder, so they never touch the demo's services or data, and stop it afterwards."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# SeaweedFS also binds S3+1..+4 and their gRPC ports (+10000): every port stays below Linux's ephemeral range
# (32768-60999), where an outgoing connection can hold a port, or a connect to an idle one can meet itself.
TEST_S3_PORT = int(os.environ.get("TEST_S3_PORT", "17333"))
TEST_MLFLOW_PORT = int(os.environ.get("TEST_MLFLOW_PORT", "25000"))
TEST_AIRFLOW_PORT = int(os.environ.get("TEST_AIRFLOW_PORT", "28080"))


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory):
    """Environment for a private stack: real SeaweedFS S3 + MLflow server + Airflow SQLite DB.

    The stack's accounts (devstack/accounts.py) are generated here, before it starts; the tests run as the
    service account `pipeline` (MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD) unless a test picks another."""
    from devstack import accounts

    local = tmp_path_factory.mktemp("local")
    accounts.ensure(local)
    env = {
        # Fresh random keys per test session: no credential literal in the repo.
        "AWS_ACCESS_KEY_ID": f"test-{secrets.token_hex(4)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{TEST_S3_PORT}",
        "S3_PORT": str(TEST_S3_PORT),
        "MLFLOW_PORT": str(TEST_MLFLOW_PORT),
        "AIRFLOW_PORT": str(TEST_AIRFLOW_PORT),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{TEST_MLFLOW_PORT}",
        "MLFLOW_TRACKING_USERNAME": "pipeline",
        "MLFLOW_TRACKING_PASSWORD": accounts.password("pipeline", local),
        "PIPELINE_LOCAL": str(local),
        "PIPELINE_HOME": str(ROOT),
        "PIPELINE_WORKSPACE": str(local / "workspace"),
        "PIPELINE_DVC_REMOTE": "s3://dvc/test-cache",
        "AIRFLOW_HOME": str(local / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "GIT_PYTHON_REFRESH": "quiet",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return env


@pytest.fixture(scope="session")
def stack(stack_env):
    """Start the private stack once per session; stop it at the end."""
    from devstack import services

    old = dict(os.environ)
    os.environ.update(stack_env)
    st = services.Stack.from_env()
    try:
        services.up(st, airflow=True)
        yield st
    finally:
        services.down(st)
        os.environ.clear()
        os.environ.update(old)
        from pipeline.adapters import storage

        storage._CLIENTS.clear()


@pytest.fixture()
def s3(stack):
    from pipeline.adapters import storage

    return storage.client()


# A recipe that really learns the tiny data (colour tells the classes apart): the bag member reaches weighted F1
# 1.0 on val and test in about 10 s of CPU, so the champion is a real one that a crippled candidate must lose to.
# The profile's one epoch at lr 7e-4 leaves a model at chance. The backbones are not under test: one epoch each.
GOOD_TINY_RECIPE = [
    "train.epochs=20",
    "train.lr=0.01",
    "train.patience=100",
    "backbones.test_efficientnet.epochs=1",
    "backbones.test_resnet.epochs=1",
]


@pytest.fixture(scope="session")
def trained(stack, stack_env):
    """The training DAG (test profile) run once on tiny data; tests share its champion and workspace."""
    import json

    from pipeline.adapters import storage
    from tests.integration.helpers import upload_tiny_dataset

    upload_tiny_dataset(storage.client(), "landing", "tiny/", per_class=8)
    conf = json.dumps({"landing_uri": "s3://landing/tiny/", "profile": "test", "set": GOOD_TINY_RECIPE})
    out = run_cli(["devstack", "run-dag", "defect_training", "--conf", conf], stack_env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return Path(stack_env["PIPELINE_WORKSPACE"])


@pytest.fixture()
def local_registry(tmp_path, monkeypatch):
    """A throwaway MLflow registry (SQLite) for one test, in this process only. ``mlflow.set_tracking_uri`` is
    process-wide: it is unset again afterwards, or every later test in the session (the stack's) would talk to it."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PIPELINE_LOCAL", str(tmp_path / "no-stack"))
    monkeypatch.chdir(tmp_path)  # a SQLite store puts artifacts under ./mlruns: here, not in the checkout
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)  # back to the environment (monkeypatch restores its old value next)


def run_cli(args: list[str], env: dict, cwd: Path | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        env={**os.environ, **env},
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def have_binary(name: str) -> bool:
    return (Path(sys.executable).parent / name).exists() or shutil.which(name) is not None


@pytest.fixture()
def airflow_api(stack, stack_env, tmp_path_factory):
    """A running Airflow (api-server, scheduler, dag-processor, triggerer) on the private stack, both DAGs
    unpaused; yields a REST client. Stopped afterwards."""
    from devstack import accounts, services
    from devstack.airflow_rest import AirflowAPI

    old = dict(os.environ)
    # Runs started by an Asset event use the defaults: the tiny test profile, a workspace of their own. The
    # scheduled watch (every 10 minutes) looks at a prefix no test writes to, so it skips: on the whole bucket it
    # would train on every test's uploads, hostile ones included, in the middle of a test's own runs.
    os.environ.update(
        PIPELINE_PROFILE="test",
        PIPELINE_WORKSPACE=str(tmp_path_factory.mktemp("loop-ws")),
        PIPELINE_LANDING_URI="s3://landing/scheduled-watch-idle/",
    )
    try:
        services.start_airflow(stack)
        api = AirflowAPI(f"http://127.0.0.1:{stack.airflow_port}", "pipeline", accounts.password("pipeline"))
        for dag_id in ("defect_data_watch", "defect_training"):
            api.unpause(dag_id)
        yield api
    finally:
        for role in services.AIRFLOW_ROLES:
            services.stop(stack, role)
        os.environ.clear()
        os.environ.update(old)


TIER_ORDER = ("unit", "security", "data", "dags", "integration", "faults", "celery", "stack")


def pytest_collection_modifyitems(items):
    """Cheap tiers first; the fault tier (it kills and restarts services) after the integration tier."""

    def tier(item) -> int:
        marks = {m.name for m in item.iter_markers()}
        return next((i for i, name in enumerate(TIER_ORDER) if name in marks), len(TIER_ORDER))

    items.sort(key=tier)  # stable: file order is kept inside a tier
