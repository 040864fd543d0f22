"""The suspects of a registered version as a Label Studio import file, for people to relabel.

    python -m pipeline review-export --model NAME [--version N | --alias champion] [--top K] --out review.json

Reads the version's ``reports/label_issues.csv`` (the ``label_issues`` stage, logged with the run), keeps the
flagged rows in rank order (``--top K`` of them), finds each photo's object under the run's landing prefix
(``data.landing_uri``) and writes:

* ``review.json`` — a JSON list of Label Studio tasks. ``data.image`` is a presigned GET URL of the landing object
  (valid ``--url-expiry`` seconds, 7 days at most): the annotator's browser fetches the photo straight from S3
  with no credentials and no S3 storage set up in Label Studio, so it must reach ``AWS_ENDPOINT_URL``. ``data``
  also carries what ``relabel`` checks later: the landing bucket, prefix and key, the object's ETag at export time
  and the photo's sha256 when it was trained on, the given and the suggested class. The suggested class is a
  pre-annotation (``predictions``), so agreeing with the model is one click;
* ``review.label_config.xml`` beside it — the project's labeling config: the photo and one single-choice list of
  the model's classes (``<Choices name="label" toName="image">``).

Photos whose object is gone from the landing prefix since training are left out (counted as ``gone``).

``--predictions s3://landing/incoming/ --below 0.5`` adds the batch DAG's unsure photos: every photo under that
prefix whose ``.prediction.json`` sidecar has no error and a confidence below the threshold becomes a task with
no given class (``source: prediction``), the predicted class as the pre-annotation. ``relabel`` moves such a photo
into the chosen class folder of the landing prefix (new labelled data) and deletes its sidecar. The prefix must be
in the landing bucket (a move is a copy inside one bucket).
"""

from __future__ import annotations

import json
import logging
import tempfile
import unicodedata
from pathlib import Path
from xml.sax.saxutils import quoteattr

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_csv, write_text_atomic

_logger = logging.getLogger(__name__)
ISSUES_ARTIFACT = "reports/label_issues.csv"
SPLIT_ARTIFACT = "split.csv"
FROM_NAME, TO_NAME = "label", "image"  # the labeling config's control and object names; relabel reads FROM_NAME
MAX_URL_EXPIRY = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days


def config_path(export_fp: Path) -> Path:
    """Where the labeling config goes: ``review.json`` -> ``review.label_config.xml``."""
    return export_fp.with_name(f"{export_fp.stem}.label_config.xml")


def labeling_config(classes: list[str]) -> str:
    """Label Studio's labeling config: what the model thinks, one choice per class (any text), then the photo.

    The choices come first, in one wrapping row, and the photo is at most 600 px wide: Label Studio scales a photo
    up to 750 px by default, which pushed the choices below the fold of a 1000 px window (seen in a browser)."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        '<View>\n  <Header value="given: $given_class | model suggests: $suggested_class"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n"
        f'  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true" maxWidth="600px"/>\n</View>\n'
    )


def landing_index(objects, prefix: str) -> dict[str, object]:
    """``class/file`` as ingest names it (NFC) -> the landing object, for keys ingest accepts."""
    from pipeline.stages.ingest import safe_relative_key

    index = {}
    for obj in sorted(objects, key=lambda o: o.key):
        parsed = safe_relative_key(obj.key[len(prefix) :])
        if not isinstance(parsed, str):
            index.setdefault("/".join(parsed), obj)  # ingest keeps the first of two NFC-equal keys too
    return index


def suspects(rows: list[dict[str, str]], top: int | None) -> list[dict[str, str]]:
    """The flagged rows of ``label_issues.csv`` in rank order, the first ``top`` of them."""
    flagged = sorted((r for r in rows if r.get("issue") == "True" and r.get("rank")), key=lambda r: int(r["rank"]))
    return flagged[:top] if top is not None else flagged


def build_task(
    row: dict[str, str], obj, bucket: str, prefix: str, url: str, sha256: str, model: str, version: str
) -> dict:
    """One Label Studio task: the photo, what relabel checks, and the suggestion as a pre-annotation."""
    data = {
        "image": url,
        "landing_bucket": bucket,
        "landing_prefix": prefix,
        "landing_key": obj.key,
        "etag": obj.etag,
        "sha256": sha256,
        "path": row["path"],
        "given_class": row["given_class"],
        "suggested_class": row["suggested_class"],
        "rank": int(row["rank"]),
        "label_quality": float(row["label_quality"]),
        "model": model,
        "model_version": version,
    }
    prediction = {
        "model_version": f"{model} v{version}",
        "result": [
            {
                "from_name": FROM_NAME,
                "to_name": TO_NAME,
                "type": "choices",
                "value": {"choices": [row["suggested_class"]]},
            }
        ],
    }
    return {"data": data, "predictions": [prediction]}


def prediction_task(record: dict, obj, bucket: str, prefix: str, url: str, model: str, version: str) -> dict:
    """One task for an unsure batch prediction: no given class, the predicted one as the pre-annotation."""
    data = {
        "image": url,
        "landing_bucket": bucket,
        "landing_prefix": prefix,
        "landing_key": obj.key,
        "etag": obj.etag,
        "source": "prediction",
        "given_class": "",
        "suggested_class": record["label"],
        "confidence": float(record["confidence"]),
        "model": model,
        "model_version": version,
        "predicted_by": f"{record.get('model_name', '')} v{record.get('model_version', '')}",
    }
    prediction = {
        "model_version": data["predicted_by"],
        "score": data["confidence"],
        "result": [
            {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [record["label"]]}}
        ],
    }
    return {"data": data, "predictions": [prediction]}


def unsure_predictions(predictions_uri: str, below: float) -> list[tuple[dict, object]]:
    """(sidecar record, photo object) for each classified photo under the prefix with confidence < ``below``."""
    from pipeline.adapters import storage
    from pipeline.commands.predict import SIDECAR_SUFFIX

    bucket, _ = storage.parse_s3_uri(predictions_uri)
    objects = {o.key: o for o in storage.list_objects(predictions_uri)}
    out = []
    for key in sorted(k for k in objects if k.endswith(SIDECAR_SUFFIX)):
        photo = objects.get(key[: -len(SIDECAR_SUFFIX)])
        record = json.loads(storage.get_bytes(f"s3://{bucket}/{key}"))
        if (
            photo is not None
            and not record.get("error")
            and record.get("label")
            and float(record.get("confidence", 1.0)) < below
        ):
            out.append((record, photo))
    return sorted(out, key=lambda item: float(item[0]["confidence"]))


def resolve_version(model: str, version: str | None, alias: str) -> object:
    from pipeline.adapters import tracking

    if version:
        return tracking.get_version(model, version)
    found = tracking.version_by_alias(tracking.connect_registry(), model, alias)
    if found is None:
        raise PipelineError(f"model {model!r} has no version with alias {alias!r}")
    return found


def run_review_export(
    model: str,
    version: str | None,
    alias: str,
    top: int | None,
    out: Path,
    url_expiry: int = MAX_URL_EXPIRY,
    predictions_uri: str = "",
    below: float = 0.5,
) -> dict:
    from pipeline.adapters import storage, tracking

    if not 0 < url_expiry <= MAX_URL_EXPIRY:
        raise PipelineError(
            f"--url-expiry must be 1..{MAX_URL_EXPIRY} seconds (a presigned URL lives 7 days at most), got {url_expiry}"
        )
    mv = resolve_version(model, version, alias)
    landing_uri = tracking.run_params(mv.run_id).get("data.landing_uri", "")
    if not landing_uri:
        raise PipelineError(f"{model} v{mv.version}: its run logged no data.landing_uri param")
    with tempfile.TemporaryDirectory() as tmp:
        issues = read_csv(tracking.download_artifact(mv.run_id, ISSUES_ARTIFACT, Path(tmp)))
        split = read_csv(tracking.download_artifact(mv.run_id, SPLIT_ARTIFACT, Path(tmp)))
    classes = sorted({unicodedata.normalize("NFC", r["class_name"]) for r in split})
    sha = {r["path"]: r["sha256"] for r in split}
    bucket, prefix = storage.parse_s3_uri(landing_uri)
    index = landing_index(storage.list_objects(landing_uri), prefix)
    tasks, gone = [], []
    for row in suspects(issues, top):
        obj = index.get(row["path"])
        if obj is None:
            gone.append(row["path"])
            continue
        url = storage.presigned_get_url(bucket, obj.key, url_expiry)
        tasks.append(build_task(row, obj, bucket, prefix, url, sha.get(row["path"], ""), model, str(mv.version)))
    unsure = []
    if predictions_uri:
        if storage.parse_s3_uri(predictions_uri)[0] != bucket:
            raise PipelineError(
                f"--predictions {predictions_uri} must be in the landing bucket {bucket!r} "
                f"({landing_uri}): relabel moves photos inside one bucket"
            )
        unsure = unsure_predictions(predictions_uri, below)
        for record, obj in unsure:
            url = storage.presigned_get_url(bucket, obj.key, url_expiry)
            tasks.append(prediction_task(record, obj, bucket, prefix, url, model, str(mv.version)))
    if gone:
        _logger.warning("%d suspect(s) no longer under %s, left out: %s", len(gone), landing_uri, gone[:5])
    write_text_atomic(out, json.dumps(tasks, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(config_path(out), labeling_config(classes))
    return {
        "tasks": len(tasks),
        "suspects": len(tasks) - len(unsure),
        "unsure_predictions": len(unsure),
        "gone": len(gone),
        "out": str(out),
        "label_config": str(config_path(out)),
        "model": model,
        "version": str(mv.version),
        "landing_uri": landing_uri,
        "classes": len(classes),
    }
