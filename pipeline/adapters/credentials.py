"""Which MLflow account our commands use: MLflow's own ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``,
or, when no password is set, the local stack's generated accounts file (``<PIPELINE_LOCAL>/accounts.json``, mode 600,
written by devstack/accounts.py). Imports nothing heavy: devstack and the CLI read it before MLflow loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.core import settings
from pipeline.core.errors import PipelineError

ACCOUNTS_FILE = "accounts.json"  # under PIPELINE_LOCAL: {account: password}, mode 600 (devstack/accounts.py)


def local_root() -> Path:
    return settings.local_root()


def use_local_account() -> str | None:
    """Take the MLflow account from the local stack's accounts file unless ``MLFLOW_TRACKING_PASSWORD`` is set.

    The account is ``MLFLOW_TRACKING_USERNAME`` (default: the service account ``pipeline``). Sets MLflow's two
    variables in this process (children inherit them); returns the account name, or None when there is no file.
    """
    if os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return os.environ.get("MLFLOW_TRACKING_USERNAME")
    fp = local_root() / ACCOUNTS_FILE
    try:
        accounts = json.loads(fp.read_text())
    except (FileNotFoundError, ValueError):
        return None
    name = os.environ.get("MLFLOW_TRACKING_USERNAME") or "pipeline"
    if name not in accounts:
        raise PipelineError(
            f"MLFLOW_TRACKING_USERNAME={name!r} is not an account in {fp}; set "
            "MLFLOW_TRACKING_PASSWORD too, or use one of " + ", ".join(sorted(accounts))
        )
    os.environ["MLFLOW_TRACKING_USERNAME"] = name
    os.environ["MLFLOW_TRACKING_PASSWORD"] = accounts[name]
    return name


def refused(exc: Exception) -> int | None:
    """401 or 403 when the MLflow server refused this account (an MlflowException), else None."""
    code = getattr(exc, "error_code", None)
    return {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(code)


def account() -> str:
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or "(anonymous)"
