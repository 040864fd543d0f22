"""Every ``PIPELINE_*`` environment variable, with its one default: the only module that reads them.

``tests/unit/test_layout.py::test_only_settings_reads_pipeline_variables`` keeps it that way. Each function reads the
environment when called (tests and the DAG's tasks change it at run time).

| variable | default | meaning |
|---|---|---|
| ``PIPELINE_PROFILE`` | ``cpu-demo`` | profile of runs started by new data, and of the model name batch prediction loads |
| ``PIPELINE_HOME`` | the checkout this package is in | the project (``dvc.yaml``, ``params.yaml``, ``profiles/``) |
| ``PIPELINE_LOCAL`` | ``<PIPELINE_HOME>/.local`` | the local stack: accounts, service data, logs (mode 0700) |
| ``PIPELINE_WORKSPACE`` | ``<PIPELINE_LOCAL>/workspace`` | the DVC workspace the DAG runs stages in |
| ``PIPELINE_MODEL_NAME`` | ``registry.model_name`` of the profile | the registered model batch prediction loads |
| ``PIPELINE_LANDING_URI`` | ``s3://landing/elpv/`` | the prefix the data watch lists |
| ``PIPELINE_DVC_REMOTE`` | ``s3://dvc/cache`` (workspace) | the DVC remote's URL |
| ``PIPELINE_DEVICE`` | ``auto`` | device for code that reads no params (serving, ``predict``) |
| ``PIPELINE_GPU_QUEUE`` | ``gpu`` | Celery queue of tasks that want a GPU |
| ``PIPELINE_RETRY_DELAY_S`` | ``20`` | seconds before a transient task failure is retried |
| ``PIPELINE_MLFLOW_UI_URL`` | the tracking URI | base of the MLflow links shown to people |
| ``PIPELINE_MLFLOW_ARTIFACTS`` | ``s3://mlflow/`` | where the embedded MLflow server keeps artifacts |
| ``PIPELINE_S3`` | ``embedded`` | ``external``: use ``AWS_ENDPOINT_URL``, start no SeaweedFS |
| ``PIPELINE_PARENT_RUN_ID`` | — | the DAG run's MLflow parent run (set by the orchestrator) |
| ``PIPELINE_USER`` | the login name | who a rollback is recorded as |
| ``PIPELINE_MALLOC`` | ``tuned`` | ``default``: do not re-execute with glibc's malloc tunables |
| ``PIPELINE_LOG_LEVEL`` | ``INFO`` | log level of the CLIs |
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PROFILE = "cpu-demo"


def _get(name: str, default: str = "") -> str:
    return os.environ.get(name, "") or default


def profile() -> str:
    return _get("PIPELINE_PROFILE", DEFAULT_PROFILE)


def home() -> Path:
    return Path(_get("PIPELINE_HOME") or Path(__file__).resolve().parents[2])


def local_root() -> Path:
    return Path(_get("PIPELINE_LOCAL") or home() / ".local").resolve()


def workspace() -> Path:
    return Path(_get("PIPELINE_WORKSPACE") or local_root() / "workspace")


def model_name() -> str:
    return _get("PIPELINE_MODEL_NAME")


def landing_uri() -> str:
    return _get("PIPELINE_LANDING_URI", "s3://landing/elpv/")


def dvc_remote(default: str) -> str:
    return _get("PIPELINE_DVC_REMOTE", default)


def device() -> str:
    return _get("PIPELINE_DEVICE", "auto").strip() or "auto"


def gpu_queue() -> str:
    return _get("PIPELINE_GPU_QUEUE", "gpu")


def retry_delay_s() -> float:
    return float(_get("PIPELINE_RETRY_DELAY_S", "20"))


def mlflow_ui_url() -> str:
    return _get("PIPELINE_MLFLOW_UI_URL")


def mlflow_artifacts() -> str:
    return _get("PIPELINE_MLFLOW_ARTIFACTS", "s3://mlflow/")


def s3_mode() -> str:
    return _get("PIPELINE_S3", "embedded")


def parent_run_id() -> str:
    return _get("PIPELINE_PARENT_RUN_ID")


def user() -> str:
    return _get("PIPELINE_USER")


def malloc() -> str:
    return _get("PIPELINE_MALLOC", "tuned")


def log_level() -> str:
    return _get("PIPELINE_LOG_LEVEL", "INFO")
