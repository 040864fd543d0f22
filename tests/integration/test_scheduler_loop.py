"""The event-driven loop under a real, running Airflow (api-server, scheduler, dag-processor, triggerer).

`airflow dags test` runs one DAG in-process; this is the scheduler's view: Asset events, asset-triggered runs,
`max_active_runs`. Two watch triggers at once must give one Asset event and one training run; the same data
again must give none.
"""

from __future__ import annotations

import pytest

from tests.integration.helpers import MODEL, upload_tiny_dataset

pytestmark = pytest.mark.integration


def test_two_watch_triggers_at_once_start_one_training_run_and_same_data_none(airflow_api, stack, s3):
    from mlflow import MlflowClient

    from devstack.airflow_rest import watch_and_follow

    upload_tiny_dataset(s3, "landing", "loop/", per_class=6)
    before = len(MlflowClient().search_model_versions(f"name = '{MODEL}'"))
    first = watch_and_follow(airflow_api, "s3://landing/loop/", settle_seconds=2, copies=2, timeout=900)
    assert first["watch_runs"] == 2 and first["emitted"] == 1 and first["asset_events"] == 1, first
    assert first["training_runs"] == 1 and first["training_state"] == "success", first
    assert first["training_run_type"] == "asset_triggered", first
    assert first["decision"]["gate"] in ("promoted", "rejected"), first
    assert len(MlflowClient().search_model_versions(f"name = '{MODEL}'")) == before + 1
    # The parent MLflow run of that DAG run is closed with its outcome, nested runs hang under it.
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("wallpaper-defect").experiment_id],
        filter_string="tags.airflow_dag_id = 'defect_training' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    parent = runs[0]
    assert parent.data.tags["gate"] == first["decision"]["gate"]
    assert parent.data.tags["model_version"] == first["decision"]["model_version"]
    children = MlflowClient().search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {c.data.tags["role"] for c in children} == {"backbone", "bag_member"}

    again = watch_and_follow(
        airflow_api, "s3://landing/loop/", settle_seconds=2, copies=1, timeout=300, quiet_seconds=20
    )
    assert again["emitted"] == 0 and again["asset_events"] == 0 and again["training_runs"] == 0, again
