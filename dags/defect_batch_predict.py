"""
### Wallpaper-defect batch prediction

Classifies new inspection photos under an `incoming/` prefix with whatever model version is `champion` now,
and writes the results back to S3 next to them:

* `<key>.prediction.json` beside each photo: label, confidence, per-class probabilities, per-photo error (a
  non-image or corrupt file gets an error; the rest of the batch is still classified), model name, version, run id;
* `<incoming>/_predictions/<dag run id>.csv`: every row of this run in one file.

Same never-re-fire logic as `defect_data_watch`: the photos (not our outputs) are fingerprinted through the
Amazon provider's S3 hook, the prefix must be stable for a settle window, and nothing runs when the fingerprint
equals the last one processed (an Airflow Variable, so it survives restarts). A photo that already has a
result is never classified again, so a retry or an overlapping run does no double work.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

from pipeline.adapters import orchestration as orc


@task(retries=2, retry_delay=timedelta(seconds=15), retry_exponential_backoff=True)
def stable_photos() -> dict | None:
    p = get_current_context()["params"]
    return orc.stable_listing(
        p["incoming_uri"], p["aws_conn_id"], p["settle_seconds"], p["max_checks"], exclude=orc.is_prediction_output
    )


@task(retries=3, retry_delay=timedelta(seconds=30), retry_exponential_backoff=True)
def classify_new(found: dict | None) -> dict:
    """Transient faults (S3 or MLflow away) are retried with backoff; the fingerprint is remembered on success."""
    ctx = get_current_context()
    p = ctx["params"]
    with orc.only_new_listing(found, p["incoming_uri"], "batch"), orc.fail_fast():
        return orc.classify_new_photos(p["incoming_uri"], p["model_uri"], p["aws_conn_id"], ctx["run_id"], p["tta"])


@dag(
    dag_id="defect_batch_predict",
    schedule=timedelta(minutes=5),
    start_date=None,
    catchup=False,
    max_active_runs=1,
    tags=["wallpaper-defect", "inference", "s3"],
    doc_md=__doc__,
    default_args={"owner": "ml-ops", "retries": 1},
    params={
        "incoming_uri": Param(
            "s3://landing/incoming/",
            type="string",
            pattern=r"^s3://[^/]+/.*",
            description="photos to classify (any depth under this prefix)",
        ),
        "model_uri": Param(
            orc.default_model_uri(),
            type="string",
            pattern=r"^(models|runs):/[^\s]+$",
            description="MLflow model URI of the bag (models:/… or runs:/…; loaded from its weights, never unpickled)",
        ),
        "aws_conn_id": Param("aws_default", type="string", description="Airflow connection for S3"),
        "settle_seconds": Param(30, type="integer", minimum=0, description="listings this far apart must agree"),
        "max_checks": Param(5, type="integer", minimum=1, description="settle windows before giving up this run"),
        "tta": Param(
            True,
            type="boolean",
            description="average over the symmetries the model was trained with (model.tta; off: the plain photo only)",
        ),
    },
)
def defect_batch_predict():
    classify_new(stable_photos())


defect_batch_predict()
