"""Scale-out proven without Docker: the training DAG under Airflow's CeleryExecutor.

Airflow (api-server, scheduler, dag-processor, triggerer) on PostgreSQL, Celery on Redis, one Celery worker that
consumes `default` and `gpu` (services.CELERY_WORKER_ARGS). A run of `defect_training` on tiny data (test profile)
is triggered through the REST API; it must succeed, its `backbone` and `train` tasks must have gone through the
`gpu` queue and been executed by that worker, and a model version must be registered in MLflow.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.celery.conftest import PORTS, report, tier_marks, tier_processes
from tests.integration.helpers import MODEL, upload_tiny_dataset

pytestmark = pytest.mark.celery

DAG = "defect_training"
GPU_TASKS = ("backbone", "train")


@pytest.fixture(scope="module")
def api(celery_stack):
    from devstack import accounts
    from devstack.airflow_rest import AirflowAPI

    client = AirflowAPI(
        f"http://{celery_stack.stack.host}:{celery_stack.stack.airflow_port}", "pipeline", accounts.password("pipeline")
    )
    _wait_for_dag(client, DAG, timeout=240)
    client.unpause(DAG)
    return client


def _wait_for_dag(client, dag_id: str, timeout: float) -> None:
    """The dag-processor has to parse and serialise the DAG before it can be triggered."""
    from pipeline.core.errors import PipelineError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.get(f"/api/v2/dags/{dag_id}/details")
            return
        except PipelineError:
            time.sleep(2)
    errors = client.get("/api/v2/importErrors").get("import_errors", [])
    raise AssertionError(f"{dag_id} was not parsed within {timeout:.0f} s; import errors: {errors}")


def test_worker_consumes_default_and_gpu_queues(celery_stack):
    nodes = celery_stack.worker_nodes()
    assert len(nodes) == 1, nodes
    assert list(nodes.values()) == [["default", "gpu"]], nodes


def test_every_listener_is_on_loopback(celery_stack):
    """S3, MLflow, api-server, PostgreSQL, Redis listen on 127.0.0.1 only; the worker, scheduler and triggerer
    open no log server (--skip-serve-logs)."""
    import psutil

    listeners = {}
    for proc in tier_processes(tier_marks(celery_stack)):
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listeners[(conn.laddr.ip, conn.laddr.port)] = proc.name()
        except psutil.Error:
            continue
    assert {ip for ip, _ in listeners} == {"127.0.0.1"}, listeners
    ports = {port for _, port in listeners}
    assert {PORTS["s3"], PORTS["mlflow"], PORTS["airflow"], PORTS["postgres"], PORTS["redis"]} <= ports, listeners


def test_training_dag_runs_on_the_celery_worker_and_registers_a_version(celery_stack, api, request):
    from mlflow import MlflowClient

    from pipeline.adapters import storage

    upload_tiny_dataset(storage.client(), "landing", "tiny/", per_class=8)
    t0 = time.monotonic()
    run_id = api.trigger(DAG, {"landing_uri": "s3://landing/tiny/", "profile": "test"})
    run = api.wait_run(DAG, run_id, timeout=1500)
    wall = time.monotonic() - t0
    tis = api.get(f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances", limit=200)["task_instances"]
    states = {_key(t): t["state"] for t in tis}
    report(
        request.config,
        f"celery tier: defect_training run {run_id} {run['state']} in {wall:.1f} s wall "
        f"(trigger -> end, {len(tis)} task instances)",
    )
    assert run["state"] == "success", states

    # The REST API's view: every task instance succeeded; the training ones went through the `gpu` queue.
    assert all(state == "success" for state in states.values()), states
    for ti in tis:
        expected = "gpu" if ti["task_id"] in GPU_TASKS else "default"
        assert ti["queue"] == expected, (ti["task_id"], ti["map_index"], ti["queue"])
        assert ti["hostname"] in (socket.getfqdn(), socket.gethostname()), ti
    gpu_tis = [t for t in tis if t["task_id"] in GPU_TASKS]
    report(
        request.config,
        "celery tier: REST task instances (task, queue, hostname, executor, pool): "
        + ", ".join(sorted({f"{t['task_id']}/{t['queue']}/{t['hostname']}/{t['executor']}/{t['pool']}" for t in tis})),
    )
    assert {t["task_id"] for t in gpu_tis} == set(GPU_TASKS), states
    assert len([t for t in gpu_tis if t["task_id"] == "backbone"]) == 2  # test profile: two backbones

    # Airflow's DB and Celery's result table (both in PostgreSQL): each task instance was sent to Celery, and the
    # one worker ran it from the queue it was routed to.
    # The worker records a task's SUCCESS just after the task has reported to Airflow: the last task of the run
    # may still read STARTED for a moment, so wait for the worker to settle.
    (worker,) = celery_stack.worker_nodes()
    deadline = time.monotonic() + 60
    while True:
        with celery_stack.pg.connect() as con, con.cursor() as cur:
            cur.execute(
                "SELECT task_id, map_index, queue, external_executor_id FROM task_instance "
                "WHERE dag_id = %s AND run_id = %s",
                (DAG, run_id),
            )
            airflow_rows = cur.fetchall()
            cur.execute(
                "SELECT task_id, status, name, worker, queue FROM celery_taskmeta WHERE task_id = ANY(%s)",
                ([r[3] for r in airflow_rows if r[3]],),
            )
            celery_rows = {r[0]: r[1:] for r in cur.fetchall()}
        if all(v[0] != "STARTED" for v in celery_rows.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(airflow_rows) == len(tis)
    for task_id, map_index, queue, celery_id in airflow_rows:
        assert celery_id, f"{task_id}[{map_index}] has no Celery task id: not run by the CeleryExecutor"
        status, name, ran_on, celery_queue = celery_rows[celery_id]
        assert (status, name, ran_on, celery_queue) == ("SUCCESS", "execute_workload", worker, queue), (
            task_id,
            map_index,
            celery_rows[celery_id],
        )

    # MLflow: the run registered a version of the test profile's model.
    decision = api.xcom(DAG, run_id, "register")
    assert decision["model_name"] == MODEL, decision
    version = MlflowClient().get_model_version(MODEL, str(decision["model_version"]))
    assert version.status == "READY", version
    report(
        request.config,
        f"celery tier: registered {MODEL} version {version.version} "
        f"(gate {decision['gate']}); {len(gpu_tis)} gpu-queue tasks on {worker}",
    )


def _key(ti: dict) -> str:
    return ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"
