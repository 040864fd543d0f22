"""
### Wallpaper-defect training

Runs the DVC stages of the pipeline in a DVC workspace, one task per stage:
`ingest → validate → split → train[member…] → evaluate → register → push`.

* **Triggers:** new data (the `landing_data` Asset, emitted by the data-watch DAG) or by hand with the
  form below (landing URI, profile, epochs, bag size, backbone).
* **Same commands as a workstation:** each task is `dvc repro --single-item <stage>` in the workspace
  (`.local/workspace` by default), so `dvc status` there is clean after a run.
* **Safety:** validation failures are not retried and stop the run before training; the registry's
  `champion` alias only moves in `register`, after the gate, so a failed run leaves it untouched.
* One active run at a time, and every stage takes the single slot of the `dvc_workspace` pool,
  because DVC's workspace lock forbids two `dvc repro` at once.
"""
from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task

LANDING_DATA = Asset(name="landing_data", uri="s3://landing/")
POOL = "dvc_workspace"
TRANSIENT = {"retries": 2, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": True}


def _stage(ws: str, name: str) -> None:
    """Run one DVC stage; a non-transient failure (bad data, bad params) fails at once, without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.errors import StageFailed
    from pipeline.workspace import run_stage

    try:
        run_stage(ws, name)
    except StageFailed as exc:
        if not exc.transient:
            raise AirflowFailException(str(exc)) from None
        raise


@task(pool=POOL, **TRANSIENT)
def prepare() -> str:
    """Create/refresh the DVC workspace with the chosen profile and the form's overrides; returns its path."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.errors import PipelineError
    from pipeline.workspace import default_workspace, form_overrides, prepare_workspace

    context = get_current_context()
    form = dict(context["params"])
    # Started by the data watch: train on the prefix whose new data fired the Asset event.
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            if (event.extra or {}).get("landing_uri"):
                form["landing_uri"] = event.extra["landing_uri"]
    try:
        return str(prepare_workspace(default_workspace(), form["profile"], form_overrides(form)))
    except PipelineError as exc:
        if exc.transient:
            raise
        raise AirflowFailException(str(exc)) from None


@task(pool=POOL, **TRANSIENT)
def ingest(ws: str) -> str:
    _stage(ws, "ingest")
    return ws


@task(pool=POOL, retries=0)
def validate(ws: str) -> str:
    """No retries: a dataset that breaks a rule stays broken until someone fixes the data."""
    _stage(ws, "validate")
    return ws


@task(pool=POOL, retries=0)
def split(ws: str) -> str:
    _stage(ws, "split")
    return ws


@task
def bag_members(ws: str) -> list[int]:
    """The bag's member seeds from the workspace params (one mapped train task each)."""
    from pathlib import Path

    from pipeline.config import load_config

    return list(load_config(Path(ws) / "params.yaml").bag.seeds)


@task(pool=POOL, retries=1, retry_delay=timedelta(seconds=10))
def train(ws: str, member: int) -> str:
    """A retry resumes from the member's last epoch checkpoint."""
    _stage(ws, f"train@{member}")
    return ws


@task(pool=POOL, retries=0, trigger_rule="all_success")
def evaluate(ws: str, trained: list[str]) -> dict:
    import json
    from pathlib import Path

    _stage(ws, "evaluate")
    m = json.loads((Path(ws) / "metrics" / "eval.json").read_text())
    return {"weighted_f1": m["weighted_f1"], "macro_f1": m["macro_f1"], "n_test": m["n_test"]}


@task(pool=POOL, **TRANSIENT)
def register(ws: str, metrics: dict) -> dict:
    import json
    from pathlib import Path

    _stage(ws, "register")
    return json.loads((Path(ws) / "registry" / "decision.json").read_text(encoding="utf-8"))


@task(pool=POOL, **TRANSIENT)
def push(ws: str, decision: dict) -> str:
    """Send data and models to the DVC remote (the S3 bucket `dvc`), so `dvc pull` restores this version."""
    from pipeline.workspace import dvc

    dvc(ws, "push", "--quiet")
    return decision["model_version"]


@dag(
    dag_id="defect_training",
    schedule=[LANDING_DATA],
    catchup=False,
    max_active_runs=1,
    tags=["wallpaper-defect", "training", "dvc", "mlflow"],
    doc_md=__doc__,
    default_args={"owner": "ml-ops", "retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "landing_uri": Param("s3://landing/elpv/", type="string", pattern=r"^s3://[^/]+/.*",
                             description="s3://bucket/prefix/ holding <class>/<image> folders"),
        "profile": Param("cpu-demo", enum=["cpu-demo", "test", "full"],
                         description="params override from profiles/ (full = params.yaml as committed)"),
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="override train.epochs"),
        "bag_size": Param(None, type=["null", "integer"], minimum=1, maximum=10,
                          description="override the number of bag members"),
        "backbone": Param(None, type=["null", "string"], description="override model.backbone (a timm name)"),
        "set": Param([], type="array", items={"type": "string"},
                     description="more overrides as section.key=value, e.g. registry.min_delta=0.01"),
    },
)
def defect_training():
    ws = split(validate(ingest(prepare())))
    trained = train.partial(ws=ws).expand(member=bag_members(ws))
    decision = register(ws, evaluate(ws, trained))
    push(ws, decision)


defect_training()
