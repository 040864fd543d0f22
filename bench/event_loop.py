"""The product's promise, timed under a running Airflow: new data in S3 → one training run → a registry version.

    python -m bench event-loop

Starts a private stack (SeaweedFS, MLflow, Airflow api-server/scheduler/dag-processor/triggerer, all on
127.0.0.1, other ports than `make ui`, data in a temp folder) so the demo registry is not touched, then:

1. uploads an ELPV subset (``BENCH_LOOP_PER_CLASS`` images per class) to ``s3://landing/elpv-loop/``;
2. triggers the data watch → it must emit once → the Asset event starts one training run (cpu-demo profile) →
   a version is registered;
3. triggers the watch again → no event, no run;
4. adds 20 more ELPV images → the watch fires again → a second training run → a new version, promoted or
   rejected by the gate.

Prints ``KEY=value`` lines with the timing of every step.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

PER_CLASS = int(os.environ.get("BENCH_LOOP_PER_CLASS", "40"))
LANDING = "s3://landing/elpv-loop/"


def run() -> dict[str, str]:
    from devstack import accounts, services
    from devstack.airflow_rest import AirflowAPI, watch_and_follow
    from devstack.demo_data import load_elpv_items
    from pipeline.adapters import storage

    root = Path(tempfile.mkdtemp(prefix="event-loop-"))
    env = {
        "S3_PORT": "16333",
        "MLFLOW_PORT": "15000",
        "AIRFLOW_PORT": "18080",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:16333",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:15000",
        "PIPELINE_LOCAL": str(root),
        "PIPELINE_WORKSPACE": str(root / "workspace"),
        "AIRFLOW_HOME": str(root / "airflow"),
        "PIPELINE_PROFILE": os.environ.get("BENCH_LOOP_PROFILE", "cpu-demo"),
        "PIPELINE_LANDING_URI": LANDING,
    }
    old = dict(os.environ)
    os.environ.update(env)
    storage._CLIENTS.clear()
    stack = services.Stack.from_env()
    out: dict[str, str] = {"LOOP_PROFILE": env["PIPELINE_PROFILE"]}
    try:
        t = time.monotonic()
        services.up(stack, airflow=True)
        os.environ.update(MLFLOW_TRACKING_USERNAME="pipeline", MLFLOW_TRACKING_PASSWORD=accounts.password("pipeline"))
        services.start_airflow(stack)
        out["LOOP_STACK_UP_S"] = f"{time.monotonic() - t:.1f}"
        api = AirflowAPI(f"http://127.0.0.1:{stack.airflow_port}", "pipeline", accounts.password("pipeline"))
        for dag_id in ("defect_data_watch", "defect_training"):
            api.unpause(dag_id)

        bucket, prefix = storage.parse_s3_uri(LANDING)
        items = load_elpv_items()
        chosen, rest, seen = [], [], {}
        for it in items:
            if seen.get(it.class_name, 0) < PER_CLASS:
                seen[it.class_name] = seen.get(it.class_name, 0) + 1
                chosen.append(it)
            else:
                rest.append(it)
        t = time.monotonic()
        for it in chosen:
            storage.upload_file(it.path, bucket, f"{prefix}{it.class_name}/{it.path.name}")
        out["LOOP_UPLOAD_IMAGES"] = str(len(chosen))
        out["LOOP_UPLOAD_S"] = f"{time.monotonic() - t:.1f}"

        steps = [("FIRST", None), ("SAME_DATA", None), ("PLUS20", rest[:: max(1, len(rest) // 20)][:20])]
        for name, extra in steps:
            if extra:
                for it in extra:
                    storage.upload_file(it.path, bucket, f"{prefix}{it.class_name}/{it.path.name}")
            r = watch_and_follow(api, LANDING, settle_seconds=5, timeout=3000)
            out[f"LOOP_{name}_WATCH_S"] = str(r["watch_s"])
            out[f"LOOP_{name}_EVENTS"] = str(r["asset_events"])
            out[f"LOOP_{name}_TRAINING_RUNS"] = str(r["training_runs"])
            if r.get("training_s") is not None:
                out[f"LOOP_{name}_TRAINING_STATE"] = r["training_state"]
                out[f"LOOP_{name}_TRAINING_S"] = str(r["training_s"])
                d = r.get("decision") or {}
                out[f"LOOP_{name}_VERSION"] = f"{d.get('model_name')} v{d.get('model_version')}"
                out[f"LOOP_{name}_GATE"] = f"{d.get('gate')}: {d.get('reason')}"
    finally:
        services.down(stack)
        os.environ.clear()
        os.environ.update(old)
        storage._CLIENTS.clear()
    return out
