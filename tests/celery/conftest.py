"""The CeleryExecutor tier: Airflow scaled out on PostgreSQL + Redis from Debian's packages, no Docker.

One private stack per module on its own ports (S3 21333, MLflow 26000, Airflow 29080, PostgreSQL 25432, Redis
26379, all below Linux's ephemeral range 32768-60999, where an outgoing connection once held 48334; TEST_CELERY_* override them) under a temporary folder; started before the first test, stopped after the
last one (also on failure), including PostgreSQL and Redis. Missing system packages skip the tier on a
workstation (`make system-deps` installs them) but fail it under CI.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PORTS = {
    name: int(os.environ.get(f"TEST_CELERY_{name.upper()}_PORT", default))
    for name, default in (("s3", 21333), ("mlflow", 26000), ("airflow", 29080), ("postgres", 25432), ("redis", 26379))
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def report(config, line: str) -> None:
    """A line on the terminal even when pytest captures output (the wall times go into the docs)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    else:
        print(line, flush=True)


@pytest.fixture(scope="module")
def celery_stack(request, tmp_path_factory):
    from devstack import celery_stack as cs

    missing = cs.missing_requirements()
    if missing:
        reason = "CeleryExecutor tier needs: " + "; ".join(missing)
        if in_ci():
            pytest.fail(reason + " (CI=true: missing system packages fail instead of skipping)", pytrace=False)
        pytest.skip(reason)

    t0 = time.monotonic()
    local = tmp_path_factory.mktemp("celery-local")
    from devstack import accounts

    accounts.ensure(local)  # the stack's accounts; the test process is the service account
    env = {
        "AWS_ACCESS_KEY_ID": f"celery-{secrets.token_hex(4)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORTS['s3']}",
        "S3_PORT": str(PORTS["s3"]),
        "MLFLOW_PORT": str(PORTS["mlflow"]),
        "AIRFLOW_PORT": str(PORTS["airflow"]),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{PORTS['mlflow']}",
        "MLFLOW_TRACKING_USERNAME": "pipeline",
        "MLFLOW_TRACKING_PASSWORD": accounts.password("pipeline", local),
        "PIPELINE_LOCAL": str(local),
        "PIPELINE_HOME": str(ROOT),
        "PIPELINE_WORKSPACE": str(local / "workspace"),
        "PIPELINE_DVC_REMOTE": "s3://dvc/celery-test-cache",
        # Runs that no form starts use these; the test triggers with an explicit conf anyway.
        "PIPELINE_PROFILE": "test",
        "PIPELINE_LANDING_URI": "s3://landing/tiny/",
        "AIRFLOW_HOME": str(local / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "GIT_PYTHON_REFRESH": "quiet",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    old = dict(os.environ)
    os.environ.update(env)
    # The DAG's own default must route the training tasks: no override from the caller's shell.
    os.environ.pop("PIPELINE_GPU_QUEUE", None)
    from devstack import services
    from pipeline.adapters import storage

    stack = cs.CeleryStack(services.Stack.from_env(), pg_port=PORTS["postgres"], redis_port=PORTS["redis"])
    try:
        stack.up()
        report(
            request.config,
            f"\ncelery tier: stack up in {time.monotonic() - t0:.1f} s "
            f"(S3, MLflow, PostgreSQL, Redis, airflow db migrate, 4 Airflow roles + 1 worker)",
        )
        yield stack
    finally:
        private = tier_marks(stack)
        errors = stack.down()
        leftovers = _leftover_processes(private)
        os.environ.clear()
        os.environ.update(old)
        storage._CLIENTS.clear()
        report(request.config, f"celery tier: whole tier wall time {time.monotonic() - t0:.1f} s (start, tests, stop)")
        assert not errors, errors
        assert not leftovers, f"processes left behind (killed now): {leftovers}"


def tier_marks(stack) -> list[str]:
    """Folders only this tier's processes run in or name: the stack root, PostgreSQL's and Redis's folders."""
    return [str(stack.stack.root), *(str(d) for d in (stack.pg.root, stack.redis.root) if d is not None)]


def tier_processes(marks: list[str]) -> list:
    """Running processes whose command line or working directory names one of ``marks``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        except psutil.Error:
            continue
        if proc.pid != os.getpid() and any(m in text for m in marks):
            found.append(proc)
    return found


def _leftover_processes(marks: list[str]) -> list[str]:
    """Processes of this tier still running after the stop; kills them and names them."""
    import psutil

    found = []
    for proc in tier_processes(marks):
        try:
            found.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            pass
    return found
