"""DAG files import cleanly and have the structure and safety settings we rely on."""
from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.dags


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "defect_training" in dagbag.dags


def test_every_dag_has_tags_docs_and_retries(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag_id
        no_retry = {t.task_id for t in dag.tasks if not t.retries}
        # Only steps whose failure means bad data or a bad model may skip retries.
        assert no_retry <= {"validate", "split", "evaluate", "bag_members"}, (dag_id, no_retry)


def test_training_dag_order_and_safety(dagbag):
    dag = dagbag.dags["defect_training"]
    order = ["prepare", "ingest", "validate", "split", "train", "evaluate", "register", "push"]
    for up, down in zip(order, order[1:]):
        assert down in dag.get_task(up).downstream_task_ids, (up, down)
    assert dag.max_active_runs == 1
    assert dag.get_task("validate").retries == 0  # bad data stays bad: no retry
    assert dag.get_task("ingest").retries >= 2  # S3 hiccups are retried
    stage_tasks = [t for t in dag.tasks if t.task_id != "bag_members"]
    assert {t.pool for t in stage_tasks} == {"dvc_workspace"}
    assert {"landing_uri", "profile", "epochs", "bag_size", "backbone"} <= set(dag.params.keys())
