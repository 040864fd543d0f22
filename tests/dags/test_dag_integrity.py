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
        assert no_retry <= {"validate", "split", "evaluate", "bag_members", "backbone_names"}, (dag_id, no_retry)


def test_training_dag_order_and_safety(dagbag):
    dag = dagbag.dags["defect_training"]
    for order in (
        ["prepare", "ingest", "validate", "split", "train", "evaluate", "register", "push", "finish_tracking"],
        ["split", "backbone", "evaluate"],
        ["prepare", "start_tracking", "validate"],
        ["train", "label_issues", "register"],
        ["ingest", "label_exclusions", "split"],
    ):
        for up, down in zip(order, order[1:]):
            assert down in dag.get_task(up).downstream_task_ids, (up, down)
    assert "start_tracking" in dag.get_task("register").upstream_task_ids  # logs into the parent run
    assert "start_tracking" in dag.get_task("validate").upstream_task_ids  # its files go into the parent run
    assert dag.default_args["on_failure_callback"].__name__ == "_mark_run_failed"
    assert dag.max_active_runs == 1
    assert dag.get_task("validate").retries == 0  # bad data stays bad: no retry
    assert dag.get_task("ingest").retries >= 2  # S3 hiccups are retried
    assert dag.get_task("label_exclusions").retries >= 2  # so are MLflow's (reading the champion's report)
    stage_tasks = [
        t for t in dag.tasks if t.task_id not in ("bag_members", "backbone_names", "start_tracking", "finish_tracking")
    ]
    assert {t.pool for t in stage_tasks} == {"dvc_workspace"}
    assert {"landing_uri", "profile", "epochs", "bag_size", "backbone"} <= set(dag.params.keys())


def test_batch_predict_dag(dagbag):
    dag = dagbag.dags["defect_batch_predict"]
    assert "classify_new" in dag.get_task("stable_photos").downstream_task_ids
    assert dag.max_active_runs == 1 and dag.get_task("classify_new").retries >= 2
    assert {"incoming_uri", "model_uri", "tta"} <= set(dag.params.keys())


def test_training_tasks_carry_their_links_into_the_serialized_dag(dagbag):
    """The api-server sees only the serialized DAG: each linked task must arrive there with its links (by XCom
    key), the other tasks with none. (The links' URLs: tests/integration/test_operator_view.py.)"""
    from airflow.serialization.serialized_objects import DagSerialization

    want = {
        "start_tracking": {"MLflow run"},
        "finish_tracking": {"MLflow run"},
        "register": {"MLflow model version"},
        "validate": {"Quarantine", "Data Docs"},
        "backbone": {"MLflow member run"},
        "train": {"MLflow member run"},
    }
    tasks = DagSerialization.to_dict(dagbag.dags["defect_training"])["dag"]["tasks"]
    got = {t["__var"]["task_id"]: set(t["__var"].get("_operator_extra_links") or {}) for t in tasks}
    assert {k: v for k, v in got.items() if v} == want
