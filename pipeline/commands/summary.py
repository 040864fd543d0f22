"""The end-of-run summary ``make demo`` prints, ending with machine-readable ``KEY=value`` lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.adapters.workspace import default_workspace
from pipeline.core.errors import PipelineError
from pipeline.stages import paths


def print_summary(ws: Path | None = None) -> int:
    ws = ws or default_workspace()
    decision_fp = ws / paths.DECISION
    if not decision_fp.exists():
        raise PipelineError(f"no decision at {decision_fp}: the training DAG has not registered a model yet")
    d = json.loads(decision_fp.read_text(encoding="utf-8"))
    metrics = json.loads((ws / paths.METRICS).read_text())
    mlflow_url = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    print()
    print("=" * 72)
    print(f"registered model : {d['model_name']} version {d['model_version']}")
    print(
        f"test weighted F1 : {d['weighted_f1']:.4f}   macro F1 {metrics['macro_f1']:.4f}   "
        f"accuracy {metrics['accuracy']:.4f}   ({metrics['n_test']} held-out images)"
    )
    print(f"gate             : {d['gate']} ({d['reason']})")
    print(f"MLflow UI        : {mlflow_url}/#/models/{d['model_name']}")
    print("Airflow UI       : `make ui`, then http://127.0.0.1:8080")
    print(f"DVC workspace    : {ws}  (dvc status / dvc metrics show there)")
    print("=" * 72)
    print(f"MODEL_NAME={d['model_name']}")
    print(f"MODEL_VERSION={d['model_version']}")
    print(f"WEIGHTED_F1={d['weighted_f1']:.4f}")
    print(f"GATE={d['gate']}")
    return 0
