"""Data arriving while the scheduler runs (real api-server, scheduler, dag-processor, triggerer).

Two watch triggers on the same new data give one training run (tests/integration/test_scheduler_loop.py);
here a second arrival lands while that training run is under way: it gets its own Asset event, the scheduler
holds it while the first run is active (max_active_runs=1; Airflow defers asset-triggered runs at the limit) and
then starts a second run, which trains on both arrivals. Also: every Airflow listener is on
127.0.0.1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from pipeline.core.io import read_csv
from tests.integration.helpers import MODEL, TINTS, png_bytes, wait_for

pytestmark = pytest.mark.faults
PREFIX = "arrivals/"
URI = f"s3://landing/{PREFIX}"


def _upload(s3, start: int, n: int) -> None:
    """Images no other test uploads (identical images would train to an already registered candidate)."""
    for c_i, (cls, tint) in enumerate(TINTS.items()):
        for i in range(start, start + n):
            s3.put_object(
                Bucket="landing", Key=f"{PREFIX}{cls}/{i:03d}.png", Body=png_bytes(7000 + c_i * 1000 + i, tint=tint)
            )


def _watch(api) -> str:
    run_id = api.trigger("defect_data_watch", {"landing_uri": URI, "settle_seconds": 2})
    api.wait_run("defect_data_watch", run_id, 300, poll=1)
    return api.task_states("defect_data_watch", run_id).get("emit_if_new")


def test_second_arrival_during_training_is_queued_then_trained_on_both(airflow_api, stack, s3):
    from mlflow import MlflowClient

    api = airflow_api
    ws = Path(os.environ["PIPELINE_WORKSPACE"])
    versions_before = len(MlflowClient().search_model_versions(f"name = '{MODEL}'"))
    known = {r["dag_run_id"] for r in api.runs("defect_training")}

    _upload(s3, 0, 6)
    assert _watch(api) == "success"
    first = wait_for(
        lambda: [r for r in api.runs("defect_training") if r["dag_run_id"] not in known], 120, "the first training run"
    )[0]["dag_run_id"]
    # The first run has ingested the first arrival; now the second lands.
    wait_for(lambda: api.task_states("defect_training", first).get("ingest") == "success", 600, "first ingest")
    _upload(s3, 6, 3)
    assert _watch(api) == "success"  # new fingerprint: a second Asset event
    # max_active_runs=1: the scheduler keeps the event queued (no second run) while the first is running ...
    time.sleep(10)
    run1 = api.get(f"/api/v2/dags/defect_training/dagRuns/{first}")
    fresh = [r for r in api.runs("defect_training") if r["dag_run_id"] not in known | {first}]
    assert run1["state"] == "running" and fresh == [], (run1["state"], fresh)
    run1 = api.wait_run("defect_training", first, 1200)
    # ... and starts it once the first has ended.
    second = wait_for(
        lambda: [r for r in api.runs("defect_training") if r["dag_run_id"] not in known | {first}],
        180,
        "the second training run",
    )[0]
    assert second["run_type"] == "asset_triggered"
    run2 = api.wait_run("defect_training", second["dag_run_id"], 1200)
    assert run1["state"] == "success" and run2["state"] == "success"
    assert run2["start_date"] >= run1["end_date"]  # one at a time: the second waited for the first
    assert len([r for r in api.runs("defect_training") if r["dag_run_id"] not in known]) == 2
    # The second run trained on both arrivals; each registered its own candidate.
    rows = read_csv(ws / "data" / "manifest.csv")
    assert len(rows) == 27 and len({r["path"] for r in rows}) == 27
    assert len(MlflowClient().search_model_versions(f"name = '{MODEL}'")) == versions_before + 2
    # The same data once more: no event, no run.
    assert _watch(api) == "skipped"


def test_every_airflow_listener_is_on_loopback(airflow_api, stack):
    pids = set()
    for name in (
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "seaweedfs",
        "mlflow",
    ):
        root = psutil.Process(int(stack.pidfile(name).read_text()))
        pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    ports = {c.laddr.port for c in listening}
    assert stack.airflow_port in ports and stack.s3_port in ports and stack.mlflow_port in ports
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, [(c.laddr, c.pid) for c in listening]
