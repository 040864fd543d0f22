"""
### Wallpaper-defect training

Runs the DVC stages of the pipeline in a DVC workspace, one task per stage:
`ingest → validate (+ label_exclusions) → split → backbone[name…] + train[member…] → evaluate + label_issues →
register → push`.

* **Tracking:** `start_tracking` opens one MLflow parent run per DAG run (the resolved config as params, the
  DAG run id as a tag); `register` logs metrics, artifacts, lineage and a nested run per backbone and per bag
  member into it; `finish_tracking` closes it with the gate decision, and a failed task marks it `FAILED`.

* **Triggers:** new data (the `landing_data` Asset, emitted by the data-watch DAG) or by hand with the
  form below (landing URI, profile, epochs, bag size, backbone).
* **Same commands as a workstation:** each task is `dvc repro --single-item <stage>` in the workspace
  (`.local/workspace` by default), so `dvc status` there is clean after a run.
* **Safety:** validation failures are not retried and stop the run before training; the registry's
  `champion` alias only moves in `register`, after the gate, so a failed run leaves it untouched.
* **Links:** in a run's grid, `start_tracking`/`finish_tracking` link to the MLflow parent run, `backbone` and
  `train` to their nested runs, `register` to the model version it created, `validate` to this run's quarantine
  list and Data Docs; the "Defect models" page (plugins/defect_models.py) puts runs, models and data side by side.
* One active run at a time, and every stage takes the single slot of the `dvc_workspace` pool,
  because DVC's workspace lock forbids two `dvc repro` at once.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

from pipeline.adapters import orchestration as orc

POOL = "dvc_workspace"
# Transient faults (S3 or MLflow unreachable, DVC lock busy) are retried with exponential backoff.
TRANSIENT = {
    "retries": 2,
    "retry_delay": timedelta(seconds=orc.retry_delay_seconds()),
    "retry_exponential_backoff": True,
}
# Training tasks go to this Celery queue (a worker with a GPU consumes it); LocalExecutor ignores queues.
GPU_QUEUE = orc.gpu_queue()


def _stage(ws: str, name: str, extra_env: dict[str, str] | None = None) -> None:
    """Run one DVC stage; a non-transient failure (bad data, bad params) fails at once, without retries."""
    with orc.fail_fast():
        orc.run_stage(ws, name, extra_env)


@task(pool=POOL, **TRANSIENT)
def prepare() -> str:
    """Create/refresh the DVC workspace with the chosen profile and the form's overrides; returns its path."""
    context = get_current_context()
    form = dict(context["params"])
    # Started by the data watch: train on the prefix whose new data fired the Asset event.
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            if (event.extra or {}).get("landing_uri"):
                form["landing_uri"] = event.extra["landing_uri"]
    with orc.fail_fast():
        return orc.prepare(form)


@orc.linked_task("run", **TRANSIENT)
def start_tracking(ws: str) -> str:
    """Open this DAG run's MLflow parent run; returns its id."""
    ctx = get_current_context()
    return orc.open_tracking_run(ws, ctx["dag"].dag_id, ctx["run_id"])


def _mark_run_failed(context) -> None:
    """on_failure_callback: a task failed for good, so this DAG run's MLflow parent run is FAILED."""
    try:
        run_id = context["ti"].xcom_pull(task_ids="start_tracking")
        if run_id:
            orc.close_tracking_run(
                run_id,
                "FAILED",
                {"failed_task": context["ti"].task_id, "failure": str(context.get("exception", ""))[:2000]},
            )
    except Exception as exc:  # never hide the task's own failure behind a tracking error
        print(f"could not mark the MLflow run failed: {exc}")


@task(pool=POOL, **TRANSIENT)
def ingest(ws: str) -> str:
    _stage(ws, "ingest")
    return ws


@task(pool=POOL, **TRANSIENT)
def label_exclusions(ws: str) -> str:
    """`data.exclude_label_issues`: the champion's flagged images, for split to leave out of train/val. Reads the
    registry (retried when MLflow is unreachable: an unreadable champion never means "nothing to exclude")."""
    _stage(ws, "label_exclusions")
    return ws


@orc.linked_task("quarantine", "data_docs", pool=POOL, retries=0)
def validate(ws: str, parent_run: str) -> str:
    """No retries: a dataset that breaks a rule stays broken until someone fixes the data. The quarantine counts
    go to an XCom either way, for the task's links and the "Defect models" page, and the quarantine list and Data
    Docs into this DAG run's MLflow parent run (the workspace keeps only the newest run's)."""
    try:
        _stage(ws, "validate")
    finally:
        orc.publish_validation(ws, parent_run)
    return ws


@task(pool=POOL, retries=0)
def split(ws: str) -> str:
    _stage(ws, "split")
    return ws


@task
def bag_members(ws: str) -> list[int]:
    """The bag's member seeds from the workspace params (one mapped train task each)."""
    return list(orc.workspace_params(ws).bag.seeds)


@task
def backbone_names(ws: str) -> list[str]:
    """The `backbones` entries from the workspace params (one mapped backbone task each)."""
    return list(orc.workspace_params(ws).backbones)


@orc.linked_task("member", pool=POOL, queue=GPU_QUEUE, retries=1, retry_delay=timedelta(seconds=10))
def backbone(ws: str, name: str) -> str:
    """Transfer-train one backbone (seed 0) so evaluate can compare it; a retry resumes from its checkpoint."""
    _stage(ws, f"backbone@{name}")
    return ws


@orc.linked_task("member", pool=POOL, queue=GPU_QUEUE, retries=1, retry_delay=timedelta(seconds=10))
def train(ws: str, member: int) -> str:
    """A retry resumes from the member's last epoch checkpoint."""
    _stage(ws, f"train@{member}")
    return ws


@task(pool=POOL, retries=0, trigger_rule="none_failed")
def evaluate(ws: str, trained: list[str], compared: list[str]) -> dict:
    """Runs when every member and backbone succeeded (an empty `backbones` list is skipped, not failed)."""
    _stage(ws, "evaluate")
    m = orc.read_output(ws, "metrics")
    return {"weighted_f1": m["weighted_f1"], "macro_f1": m["macro_f1"], "n_test": m["n_test"]}


@task(pool=POOL)
def label_issues(ws: str, trained: list[str]) -> dict:
    """cleanlab on the bag's out-of-bag probabilities; register logs the CSV, counts and thumbnail grid."""
    _stage(ws, "label_issues")
    m = orc.read_output(ws, "label_issues")
    return {k: m[k] for k in ("n_scored", "n_unscored", "n_flagged")}


@orc.linked_task("version", pool=POOL, **TRANSIENT)
def register(ws: str, metrics: dict, parent_run: str, issues: dict) -> dict:
    _stage(ws, "register", {"PIPELINE_PARENT_RUN_ID": parent_run})
    return orc.read_output(ws, "decision")


@task(pool=POOL, **TRANSIENT)
def push(ws: str, decision: dict) -> str:
    """Send data and models to the DVC remote (the S3 bucket `dvc`), so `dvc pull` restores this version."""
    orc.dvc_push(ws)
    return decision["model_version"]


@orc.linked_task("run", **TRANSIENT)
def finish_tracking(parent_run: str, decision: dict, pushed: str) -> None:
    """Close the parent run with the outcome (also when DVC found everything up to date and nothing retrained)."""
    orc.close_tracking_run(
        parent_run,
        "FINISHED",
        {
            "gate": decision["gate"],
            "model_name": decision["model_name"],
            "model_version": decision["model_version"],
            "registered_in_run": decision["run_id"],
            "gate_reason": decision["reason"],
        },
    )


@dag(
    dag_id="defect_training",
    schedule=[orc.LANDING_DATA],
    catchup=False,
    max_active_runs=1,
    tags=["wallpaper-defect", "training", "dvc", "mlflow"],
    doc_md=__doc__,
    default_args={
        "owner": "ml-ops",
        "retries": 1,
        "retry_delay": timedelta(seconds=30),
        "on_failure_callback": _mark_run_failed,
    },
    params={
        "landing_uri": Param(
            orc.default_landing_uri(),
            type="string",
            pattern=r"^s3://[^/]+/.*",
            description="s3://bucket/prefix/ holding <class>/<image> folders (an Asset event "
            "from the data watch sets it)",
        ),
        # Runs started by new data use the defaults: PIPELINE_PROFILE picks the profile for them.
        "profile": Param(
            orc.default_profile(),
            enum=orc.profile_names(),
            description="params override from profiles/ (full = params.yaml as committed)",
        ),
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="override train.epochs"),
        "bag_size": Param(
            None, type=["null", "integer"], minimum=1, maximum=10, description="override the number of bag members"
        ),
        "backbone": Param(None, type=["null", "string"], description="override model.backbone (a timm name)"),
        "set": Param(
            [],
            type="array",
            items={"type": "string"},
            description="more overrides as section.key=value, e.g. train.lr=0.0005 (model, train, bag, "
            "backbones, split, label_issues and registry.model_name; the gate and the decode "
            "guards only in a profile)",
        ),
    },
)
def defect_training():
    ws0 = prepare()
    parent_run = start_tracking(ws0)
    ingested = ingest(ws0)
    ws = split(validate(ingested, parent_run))
    label_exclusions(ingested) >> ws
    compared = backbone.partial(ws=ws).expand(name=backbone_names(ws))
    trained = train.partial(ws=ws).expand(member=bag_members(ws))
    decision = register(ws, evaluate(ws, trained, compared), parent_run, label_issues(ws, trained))
    finish_tracking(parent_run, decision, push(ws, decision))


defect_training()
