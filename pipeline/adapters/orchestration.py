"""What DAG files import: the one public surface between ``dags/`` and the pipeline (Airflow side only).

DAG files wire tasks; everything they call comes from here, so the Asset, the skip rules and the error policy
exist once. Airflow's DAG processor imports DAG files often: this module imports only ``airflow.sdk`` at the
top, and everything heavy (torch, pandas, GX, MLflow) inside the functions.

* :data:`LANDING_DATA`: the Asset the data watch emits and the training DAG is scheduled on.
* :func:`only_new_listing`: skip unless a listing is stable, non-empty and new; remember it when the body ends.
* :func:`fail_fast`: a non-transient :class:`~pipeline.core.errors.PipelineError` (bad data, bad params) fails
  the task at once, without retries; a transient one (S3 or MLflow away) is raised for Airflow to retry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from airflow.sdk import Asset, Variable

from pipeline.core import settings

LANDING_DATA = Asset(name="landing_data", uri="s3://landing/")


@contextmanager
def fail_fast() -> Iterator[None]:
    """Non-transient pipeline errors → ``AirflowFailException`` (no retry); transient ones propagate (retried)."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.core.errors import PipelineError

    try:
        yield
    except PipelineError as exc:
        if exc.transient:
            raise
        raise AirflowFailException(str(exc)) from None


def fingerprint_key(kind: str, uri: str) -> str:
    """The Airflow Variable holding the last processed fingerprint of ``uri`` for ``kind`` (``watch``, ``batch``)."""
    return f"defect_{kind}_last_fingerprint:{uri}"


def state_key(uri: str) -> str:
    """The asset state store key of the last fingerprint the data watch emitted for ``uri``."""
    return f"last_fingerprint:{uri}"


@contextmanager
def only_new_listing(found: dict | None, uri: str, kind: str, store=None) -> Iterator[dict]:
    """Skip the task unless ``found`` (from :func:`stable_listing`) is stable, non-empty and not seen before;
    when the ``with`` body finishes without an error, remember its fingerprint.

    Where it is remembered: ``store`` (the task's ``context["asset_state_store"][asset]``, Airflow's asset state
    store: the data watch) or a durable Airflow Variable (:func:`fingerprint_key`: the batch DAG, which emits no
    asset). A store that is still empty takes over the Variable an older version kept for ``uri``, once: the
    Variable is read as the last fingerprint and deleted after the store holds the new one.
    """
    from airflow.sdk.exceptions import AirflowSkipException

    if found is None:
        raise AirflowSkipException(f"{uri} still changing; will look again next time")
    if found["objects"] == 0:
        raise AirflowSkipException(f"{uri} is empty")
    legacy = fingerprint_key(kind, uri)
    last = store.get(state_key(uri)) if store is not None else None
    from_variable = False
    if last is None:
        last = Variable.get(legacy, default=None)
        from_variable = last is not None

    def remember(fingerprint: str) -> None:
        if store is None:
            Variable.set(legacy, fingerprint)
            return
        store.set(state_key(uri), fingerprint)
        if from_variable:
            Variable.delete(legacy)  # taken over: the store holds it now

    if last == found["fingerprint"]:
        if from_variable and store is not None:
            remember(last)
        raise AirflowSkipException(f"same data as last time ({found['fingerprint'][:12]}); nothing to do")
    yield found
    remember(found["fingerprint"])


def s3_client(conn_id: str):
    """The boto3 client of the Amazon provider's S3 hook (Airflow connection ``conn_id``, else ``AWS_*``)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=conn_id).get_conn()


def stable_listing(uri: str, conn_id: str, settle_seconds: float, max_checks: int, exclude=None) -> dict | None:
    from pipeline.adapters.watch import stable_listing as _stable

    return _stable(uri, s3_client(conn_id), settle_seconds, max_checks, exclude)


def is_prediction_output(key: str) -> bool:
    from pipeline.commands.predict import is_output_key

    return is_output_key(key)


def classify_new_photos(incoming_uri: str, model_uri: str, conn_id: str, run_label: str, tta: bool) -> dict:
    from pipeline.commands.predict import run_batch

    return run_batch(incoming_uri, model_uri, s3_client(conn_id), run_label=run_label, tta=tta)


def default_model_uri() -> str:
    from pipeline.adapters.workspace import default_model_uri as _default

    return _default()


# --- the training DAG -----------------------------------------------------------------------------------------


def prepare(form: dict) -> str:
    """Create/refresh the DVC workspace for the run's form (profile + overrides); returns its path."""
    from pipeline.adapters.profiles import form_overrides
    from pipeline.adapters.workspace import default_workspace, prepare_workspace

    return str(prepare_workspace(default_workspace(), form["profile"], form_overrides(form)))


def run_stage(ws: str, name: str, extra_env: dict[str, str] | None = None) -> None:
    """``dvc repro --single-item <name>`` in the workspace; a failed stage raises ``StageFailed`` (see fail_fast)."""
    from pipeline.adapters.workspace import run_stage as _run

    _run(ws, name, extra_env)


def workspace_params(ws: str):
    """The workspace's validated config (``params.yaml`` merged from the profile and the run's overrides)."""
    from pathlib import Path

    from pipeline.core.config import load_config
    from pipeline.stages import paths

    return load_config(Path(ws) / paths.PARAMS)


def read_output(ws: str, what: str) -> dict:
    """A stage's small JSON output by name: ``metrics`` (evaluate), ``label_issues`` or ``decision`` (register)."""
    import json
    from pathlib import Path

    from pipeline.stages import paths

    fp = {"metrics": paths.METRICS, "label_issues": paths.LABEL_ISSUES_METRICS, "decision": paths.DECISION}[what]
    return json.loads((Path(ws) / fp).read_text(encoding="utf-8"))


def dvc_push(ws: str) -> None:
    from pipeline.adapters.workspace import dvc

    dvc(ws, "push", "--quiet")


def open_tracking_run(ws: str, dag_id: str, run_id: str) -> str:
    """Open this DAG run's MLflow parent run (the resolved config as params); returns its id."""
    from pipeline.adapters import tracking

    cfg = workspace_params(ws)
    tags = {
        "airflow_dag_id": dag_id,
        "airflow_run_id": run_id,
        "profile": cfg.profile,
        "landing_uri": cfg.data.landing_uri,
        "git_commit": tracking.git_commit(None),
    }
    return tracking.open_pipeline_run(cfg.registry.experiment, cfg.to_dict(), f"airflow-{run_id}", tags)


def close_tracking_run(run_id: str, status: str, tags: dict[str, str]) -> None:
    from pipeline.adapters import tracking

    tracking.close_pipeline_run(run_id, status, tags)


def retry_delay_seconds() -> float:
    """First retry delay of transient faults (``PIPELINE_RETRY_DELAY_S``, default 20; the fault tests shorten it)."""
    return settings.retry_delay_s()


def default_landing_uri() -> str:
    """The prefix the scheduled DAGs watch and train on when no form sets one (``PIPELINE_LANDING_URI``)."""
    return settings.landing_uri()


def default_profile() -> str:
    """The profile of runs started by new data (``PIPELINE_PROFILE``; the Makefile sets ``cpu-demo``)."""
    return settings.profile()


def profile_names() -> list[str]:
    """``full`` (params.yaml as committed) and every ``profiles/*.yaml``, for the training form's choice."""
    from pipeline.adapters.workspace import project_home

    return ["full", *sorted(p.stem for p in (project_home() / "profiles").glob("*.yaml"))]


def gpu_queue() -> str:
    """The Celery queue of the training tasks (``PIPELINE_GPU_QUEUE``, default ``gpu``)."""
    return settings.gpu_queue()


# --- extra links: what a task instance produced, one click away in the run's grid ------------------------------
# Airflow 3 evaluates a task's ``operator_extra_links`` in the worker when the task instance ends (success or
# failure) and stores each URL as an XCom of that very task instance; the api-server only reads it back. So every
# link below is resolved from what this task instance (or this DAG run's ``start_tracking``) wrote, never from
# "the latest" anything. Links into the plugin's pages are paths on the api-server (plugins/defect_models.py).

PLUGIN_PREFIX = "/defect-models"
TRACKING_TASK = "start_tracking"
VALIDATION_KEY = "validation_report"


def airflow_ui_base() -> str:
    """Airflow's UI as a browser reaches it (``AIRFLOW__API__BASE_URL``); empty = root-relative links."""
    return os.environ.get("AIRFLOW__API__BASE_URL", "").rstrip("/")


def plugin_url(path: str) -> str:
    """A page of the plugin (plugins/defect_models.py) under the api-server."""
    return airflow_ui_base() + PLUGIN_PREFIX + path


def _run_path(ti_key) -> str:
    from urllib.parse import quote

    return f"/{quote(ti_key.dag_id, safe='')}/{quote(ti_key.run_id, safe='')}"


def _links():
    """The link classes (built on first use: the DAG processor imports DAG files often)."""
    global _LINKS
    if _LINKS is None:
        _LINKS = _define_links()
    return _LINKS


_LINKS = None


def _define_links() -> dict:
    from airflow.sdk import BaseOperatorLink

    class ModelVersionLink(BaseOperatorLink):
        """``register`` → the MLflow model version its decision names (promoted or rejected)."""

        name = "MLflow model version"

        def get_link(self, operator, *, ti_key) -> str:
            from pipeline.adapters import tracking

            decision = ti_key.xcom_pull(task_ids=ti_key.task_id)
            if not decision:
                return ""
            return tracking.version_ui_url(decision["model_name"], decision["model_version"])

    class ParentRunLink(BaseOperatorLink):
        """``start_tracking``/``finish_tracking`` → the DAG run's MLflow parent run (start_tracking's id)."""

        name = "MLflow run"

        def get_link(self, operator, *, ti_key) -> str:
            from pipeline.adapters import tracking

            run_id = ti_key.xcom_pull(task_ids=TRACKING_TASK)
            return tracking.run_ui_url(run_id) if run_id else ""

    class MemberRunLink(BaseOperatorLink):
        """``backbone``/``train`` → that model's nested run. ``register`` logs it after this task ends, so the
        link names it (DAG run, role, run name) and the plugin finds it under this DAG run's parent run."""

        name = "MLflow member run"

        def get_link(self, operator, *, ti_key) -> str:
            from urllib.parse import urlencode

            role, run_name = member_run_name(ti_key.task_id, operator.op_kwargs)
            return plugin_url(f"/member{_run_path(ti_key)}?" + urlencode({"role": role, "name": run_name}))

    class QuarantineLink(BaseOperatorLink):
        """``validate`` → this run's quarantine list and counts (from the XCom validate wrote)."""

        name = "Quarantine"

        def get_link(self, operator, *, ti_key) -> str:
            if not ti_key.xcom_pull(task_ids=ti_key.task_id, key=VALIDATION_KEY):
                return ""
            return plugin_url(f"/validation{_run_path(ti_key)}")

    class DataDocsLink(BaseOperatorLink):
        """``validate`` → this run's Great Expectations Data Docs."""

        name = "Data Docs"

        def get_link(self, operator, *, ti_key) -> str:
            report = ti_key.xcom_pull(task_ids=ti_key.task_id, key=VALIDATION_KEY)
            if not report or not report.get("data_docs_sha256"):
                return ""
            return plugin_url(f"/validation{_run_path(ti_key)}/data_docs/index.html")

    return {
        "version": ModelVersionLink,
        "run": ParentRunLink,
        "member": MemberRunLink,
        "quarantine": QuarantineLink,
        "data_docs": DataDocsLink,
    }


def member_run_name(task_id: str, op_kwargs: dict) -> tuple[str, str]:
    """(role, run name) of the nested run ``register`` logs for a ``backbone``/``train`` task instance."""
    if task_id == "backbone":
        return "backbone", f"backbone-{op_kwargs['name']}"
    return "bag_member", f"member_{op_kwargs['member']}"


def link_classes() -> list:
    """Every extra-link class the training DAG uses (the plugin lists them)."""
    return list(_links().values())


_OPERATORS: dict[tuple[str, ...], type] = {}


def linked_task(*links: str, **task_kwargs):
    """``@task(**task_kwargs)`` whose task instances show the extra links named in ``links``
    (``version``, ``run``, ``member``, ``quarantine``, ``data_docs``).

    A TaskFlow ``@task`` takes no ``operator_extra_links`` argument: links are a class attribute of the operator.
    So this is the same decorator with a subclass of its operator that carries them (mapped tasks included).
    """
    from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
    from airflow.sdk.bases.decorator import task_decorator_factory

    if links not in _OPERATORS:
        classes = _links()
        name = "LinkedTask_" + "_".join(links)
        _OPERATORS[links] = type(
            name,
            (_PythonDecoratedOperator,),
            {
                "operator_extra_links": tuple(classes[k]() for k in links),
                "custom_operator_name": "@task",
                "__module__": __name__,
            },
        )
        globals()[name] = _OPERATORS[links]  # importable by name, like any operator class
    return task_decorator_factory(decorated_operator_class=_OPERATORS[links], **task_kwargs)


def publish_validation(ws: str, parent_run: str | None = None) -> None:
    """XCom ``validation_report`` of the running task: counts by reason and the SHA-256 of the quarantine list
    and of the Data Docs page, so the plugin shows this run's files from the workspace while it still holds them.
    A copy goes into the MLflow parent run (``archived_in``), where the plugin finds them once a later run has
    replaced the workspace's. A failed upload is logged and leaves ``archived_in`` empty: the validation result
    stands either way (validate is not retried)."""
    from airflow.sdk import get_current_context

    summary = validation_summary(ws)
    if summary is None:
        return
    summary["archived_in"] = ""
    if parent_run:
        from pathlib import Path

        from pipeline.adapters import tracking

        try:
            tracking.archive_validation(parent_run, Path(summary["quarantine"]), Path(summary["data_docs"]))
            summary["archived_in"] = parent_run
        except Exception as exc:  # noqa: BLE001 - the copy is a convenience; the workspace still has the files
            print(f"could not copy the quarantine list and Data Docs into MLflow run {parent_run}: {exc}")
    get_current_context()["ti"].xcom_push(key=VALIDATION_KEY, value=summary)


def validation_summary(ws: str) -> dict | None:
    """What validate left in the workspace, small enough for an XCom; None when it wrote no quarantine list."""
    import csv
    import hashlib
    import json
    from collections import Counter
    from pathlib import Path

    from pipeline.stages import paths

    root = Path(ws)
    qfp, docs = root / paths.QUARANTINE, root / paths.DATA_DOCS / "index.html"
    if not qfp.exists():
        return None
    with qfp.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    report_fp = root / paths.VALIDATION_REPORT
    report = json.loads(report_fp.read_text(encoding="utf-8")) if report_fp.exists() else {}
    return {
        "quarantine": str(qfp),
        "data_docs": str(docs.parent),
        "quarantined": len(rows),
        "files": report.get("files"),
        "by_reason": dict(Counter(reason_kind(r["reason"]) for r in rows).most_common()),
        "quarantine_sha256": hashlib.sha256(qfp.read_bytes()).hexdigest(),
        "data_docs_sha256": hashlib.sha256(docs.read_bytes()).hexdigest() if docs.exists() else "",
    }


def reason_kind(reason: str) -> str:
    """A quarantine reason's first rule, without the file it names (validate joins the rules a file breaks with
    ``; ``): ``label conflict: same bytes as a/1.png`` → ``label conflict``."""
    first = reason.split("; ", 1)[0]
    return first.split(":", 1)[0].strip() or reason
