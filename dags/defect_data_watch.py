"""
### Wallpaper-defect data watch

Looks at the landing prefix through the Amazon provider's S3 hook (Airflow connection `aws_conn_id`, or the
`AWS_*` variables and `AWS_ENDPOINT_URL`), fingerprints it (keys + ETags + sizes), waits until two listings a
settle window apart agree (a half-finished upload never starts training), and emits an event on the Asset
`landing_data` only when the fingerprint differs from the last one it emitted. That last fingerprint is kept in
the asset's state store (Airflow 3.3, key `last_fingerprint:<landing uri>`), so it survives restarts; the Variable
`defect_watch_last_fingerprint:<landing uri>` an older version kept is taken over once and deleted. The event's extra
carries the fingerprint, object count and landing URI; `defect_training` is scheduled on that Asset.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

from pipeline.adapters import orchestration as orc


@task(retries=2, retry_delay=timedelta(seconds=15), retry_exponential_backoff=True)
def stable_fingerprint() -> dict | None:
    """None when the prefix is still changing: then nothing is emitted this time."""
    p = get_current_context()["params"]
    found = orc.stable_listing(p["landing_uri"], p["aws_conn_id"], p["settle_seconds"], p["max_checks"])
    return None if found is None else {**found, "landing_uri": p["landing_uri"]}


@task(outlets=[orc.LANDING_DATA], retries=1)
def emit_if_new(found: dict | None) -> str:
    context = get_current_context()
    uri = context["params"]["landing_uri"]
    with orc.only_new_listing(found, uri, "watch", context["asset_state_store"][orc.LANDING_DATA]):
        context["outlet_events"][orc.LANDING_DATA].extra = found
    return found["fingerprint"]


@dag(
    dag_id="defect_data_watch",
    schedule=timedelta(minutes=10),
    start_date=None,
    catchup=False,
    max_active_runs=1,
    tags=["wallpaper-defect", "data", "s3"],
    doc_md=__doc__,
    default_args={"owner": "ml-ops", "retries": 1},
    params={
        "landing_uri": Param(
            orc.default_landing_uri(), type="string", pattern=r"^s3://[^/]+/.*", description="the prefix to watch"
        ),
        "aws_conn_id": Param("aws_default", type="string", description="Airflow connection for S3"),
        "settle_seconds": Param(60, type="integer", minimum=0, description="listings this far apart must agree"),
        "max_checks": Param(5, type="integer", minimum=1, description="settle windows before giving up this run"),
    },
)
def defect_data_watch():
    emit_if_new(stable_fingerprint())


defect_data_watch()
