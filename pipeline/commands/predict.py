"""Batch prediction with a registered bag: a folder or S3 prefix of photos → CSV; the DACON submission file.

    python -m pipeline predict --model models:/<name>@champion --input DIR_OR_S3_PREFIX --out predictions.csv
    python -m pipeline submission --model models:/<name>@champion --dacon-dir DIR --out submission.csv

``--model`` is an MLflow model URI of the bag pyfunc (``models:/name@alias``, ``models:/name/3``,
``runs:/...``) or a local folder holding ``member_*`` folders (a DVC workspace's ``models/``). The bag is rebuilt
from its weights and meta files; the pyfunc's pickle is never loaded (``tracking.load_bag``).
Every input row gets a row out: a file that is not an image, is corrupt or too large gets an ``error``
and an empty ``label``; the others are still predicted. The bag averages over the symmetries every class was
trained with (``model.tta``, recorded per member as ``tta_variants``), as evaluate and the gate scored it;
``--no-tta`` turns that off. Probabilities and confidence are calibrated with the temperature a
registered bag ships (``pipeline.core.calibration``), after any TTA; a local ``models/`` folder has none and
gives the raw averages. Labels are the same either way.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import MAX_BYTES, MAX_PIXELS
from pipeline.core.errors import PipelineError
from pipeline.core.io import write_csv

_logger = logging.getLogger(__name__)
# Written next to the inputs by the batch DAG; never inputs themselves (and never part of the fingerprint).
SIDECAR_SUFFIX = ".prediction.json"
RESULTS_DIR = "_predictions/"


@dataclass
class LoadedModel:
    predictor: object  # pipeline.inference.BagPredictor
    uri: str
    name: str = ""
    version: str = ""
    run_id: str = ""


def load_model(uri: str) -> LoadedModel:
    """Load the bag behind ``uri``; resolve ``models:/name@alias`` to the version it points at now.

    The bag computes on ``PIPELINE_DEVICE`` (auto | cpu | cuda; default auto), as the pyfunc does.
    """
    from pipeline.core.devices import env_device
    from pipeline.core.inference import BagPredictor

    local = Path(uri)
    if local.is_dir() and any(local.glob("member_*/meta.json")):
        dirs = sorted(d for d in local.glob("member_*") if (d / "meta.json").exists())
        return LoadedModel(BagPredictor.from_dirs(dirs, env_device()), str(local.resolve()))
    from pipeline.adapters import tracking

    name, version, run_id = tracking.resolve_model_uri(uri)
    # Pin the resolved version, so an alias moving while we load cannot mix two versions.
    pinned = f"models:/{name}/{version}" if name and version else uri
    # From its files, never unpickled: the URI may come from a trigger's conf.
    return LoadedModel(tracking.load_bag(pinned, env_device()), uri, name, version, run_id)


def predict_images(predictor, images: list, tta: bool | None = None) -> np.ndarray:
    """Probabilities (N × classes) for PIL images; ``tta`` None keeps the model's own test-time augmentation
    (``model.tta``: the symmetries every class was trained with), False turns it off, True turns it on."""
    from pipeline.core.images import resize_uint8, to_rgb

    if tta is not None:
        predictor.tta = tta
    arrays = {s: np.stack([resize_uint8(to_rgb(im), s) for im in images]) for s in predictor.sizes()}
    return predictor.predict_proba_arrays(arrays)


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class Item:
    id: str
    read: Callable[[], bytes]  # raises on I/O errors; the row then gets the error


def _local_items(folder: Path) -> list[Item]:
    if not folder.exists():
        raise PipelineError(f"input folder {folder} does not exist")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return [Item(p.relative_to(folder).as_posix(), p.read_bytes) for p in files if not is_output_key(p.name)]


def is_output_key(key: str) -> bool:
    return key.endswith(SIDECAR_SUFFIX) or f"/{RESULTS_DIR}" in f"/{key}"


def s3_items(uri: str, s3_client=None) -> list[Item]:
    """Every object under the prefix except our own outputs; ``id`` = key relative to the prefix."""
    from pipeline.adapters import storage

    bucket, prefix = storage.parse_s3_uri(uri)
    items = []
    for obj in storage.list_objects(uri, s3_client):
        rel = obj.key[len(prefix) :]
        if not rel or obj.key.endswith("/") or is_output_key(rel):
            continue
        if obj.size > MAX_BYTES:
            items.append(Item(rel, _too_large(obj.size)))
            continue
        items.append(Item(rel, lambda k=obj.key: storage.get_bytes(f"s3://{bucket}/{k}", s3_client)))
    return items


def _too_large(size: int) -> Callable[[], bytes]:
    def read() -> bytes:
        raise ValueError(f"file is {size} bytes, over the {MAX_BYTES}-byte limit")

    return read


def input_items(source: str, s3_client=None) -> list[Item]:
    items = s3_items(source, s3_client) if source.startswith("s3://") else _local_items(Path(source))
    if not items:
        raise PipelineError(f"no files to classify under {source}")
    return items


# --------------------------------------------------------------------------------------------- predict


# Decoded pixels held at once: a batch closes early rather than exceed it (32 photos of 40 MP each would be ~3.8 GB
# of RGB). One photo alone may still reach MAX_PIXELS.
BATCH_PIXELS = 2 * MAX_PIXELS


def _decoded(items: list[Item]) -> Iterator[tuple[Item, object, str]]:
    """(item, RGB image or None, error) per item, in order; a store outage stops the run (transient)."""
    from pipeline.adapters.storage import StorageError
    from pipeline.core.images import decode_rgb

    for item in items:
        try:
            data = item.read()
            if len(data) > MAX_BYTES:
                raise ValueError(f"file is {len(data)} bytes, over the {MAX_BYTES}-byte limit")
            yield item, decode_rgb(data, max_pixels=MAX_PIXELS), ""
        except StorageError:
            raise  # the store went away: a transient failure of the whole run, not of this photo
        except (ValueError, OSError) as exc:
            yield item, None, str(exc) or type(exc).__name__


def batches(
    items: list[Item], batch_size: int = 32, max_pixels: int = BATCH_PIXELS
) -> Iterator[list[tuple[Item, object, str]]]:
    """Decoded items in batches of at most ``batch_size`` photos and ``max_pixels`` decoded pixels (a batch holds
    at least one photo)."""
    batch, pixels = [], 0
    for entry in _decoded(items):
        size = entry[1].width * entry[1].height if entry[1] is not None else 0
        if batch and (len(batch) == batch_size or pixels + size > max_pixels):
            yield batch
            batch, pixels = [], 0
        batch.append(entry)
        pixels += size
    if batch:
        yield batch


def predict_items(
    model: LoadedModel, items: list[Item], tta: bool | None = None, batch_size: int = 32, max_pixels: int = BATCH_PIXELS
) -> Iterator[dict]:
    """One row per item, in order: id, label, confidence, error, prob_<class>...; bad rows never stop the batch."""
    names = model.predictor.class_names
    for chunk in batches(items, batch_size, max_pixels):
        ok = [i for i, (_, im, _) in enumerate(chunk) if im is not None]
        probs = predict_images(model.predictor, [chunk[i][1] for i in ok], tta) if ok else np.zeros((0, len(names)))
        # Probabilities and confidence are calibrated (the bag's temperature); the label is the raw argmax.
        by_row = dict(zip(ok, zip(probs, model.predictor.calibrated(probs))))
        for i, (item, _, error) in enumerate(chunk):
            row = {"id": item.id, "label": "", "confidence": 0.0, "error": error}
            raw, shown = by_row.get(i, (None, None))
            row.update({f"prob_{c}": (float(shown[k]) if shown is not None else "") for k, c in enumerate(names)})
            if raw is not None:
                k = int(raw.argmax())
                row.update(label=names[k], confidence=float(shown[k]))
            yield row


def rows_to_csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def run_predict(model_uri: str, source: str, out: Path, tta: bool | None = None) -> dict:
    model = load_model(model_uri)
    rows = list(predict_items(model, input_items(source), tta))
    write_csv(out, rows, list(rows[0]))
    failed = sum(1 for r in rows if r["error"])
    _logger.info("predict: %d rows (%d with errors) -> %s", len(rows), failed, out)
    return {
        "rows": len(rows),
        "errors": failed,
        "out": str(out),
        "model_uri": model_uri,
        "model_version": model.version,
    }


# ------------------------------------------------------------------------------------------------ DACON


def run_submission(model_uri: str, dacon_dir: Path, out: Path, tta: bool | None = None) -> dict:
    """``submission.csv`` in ``test.csv`` order with exactly ``sample_submission.csv``'s ids and header."""
    from pipeline.core.io import read_csv

    for name in ("test.csv", "sample_submission.csv"):
        if not (dacon_dir / name).exists():
            raise PipelineError(
                f"{dacon_dir / name} is missing; --dacon-dir must hold test/, test.csv and sample_submission.csv"
            )
    test = read_csv(dacon_dir / "test.csv")
    sample = read_csv(dacon_dir / "sample_submission.csv")
    if not test or not {"id", "img_path"} <= set(test[0]):
        raise PipelineError(f"{dacon_dir / 'test.csv'} needs columns id,img_path")
    if not sample or list(sample[0]) != ["id", "label"]:
        raise PipelineError(f"{dacon_dir / 'sample_submission.csv'} needs the header id,label")
    test_ids, sample_ids = [r["id"] for r in test], [r["id"] for r in sample]
    if test_ids != sample_ids:
        bad = next(
            (i for i, (a, b) in enumerate(zip(test_ids, sample_ids)) if a != b), min(len(test_ids), len(sample_ids))
        )
        raise PipelineError(
            f"test.csv and sample_submission.csv disagree at row {bad + 2} ({len(test_ids)} vs {len(sample_ids)} ids)"
        )
    root = dacon_dir.resolve()
    items = []
    for r in test:
        path = (dacon_dir / r["img_path"]).resolve()
        if not path.is_relative_to(root):
            raise PipelineError(f"test.csv row {r['id']}: img_path {r['img_path']!r} leaves {dacon_dir}")
        items.append(Item(r["id"], path.read_bytes))
    model = load_model(model_uri)
    rows = list(predict_items(model, items, tta))
    failed = [r for r in rows if r["error"]]
    if failed:
        listed = "; ".join(f"{r['id']}: {r['error']}" for r in failed[:5])
        raise PipelineError(
            f"{len(failed)} test image(s) could not be classified, so no submission was written "
            f"(a submission needs every id): {listed}"
        )
    write_csv(out, rows, ["id", "label"])
    return {"rows": len(rows), "out": str(out), "model_uri": model_uri, "model_version": model.version}


# ------------------------------------------------------------------------------------------ batch (DAG)


def run_batch(
    incoming_uri: str, model_uri: str, s3_client=None, run_label: str = "manual", tta: bool | None = None
) -> dict:
    """Classify photos under ``incoming_uri`` that have no result yet; write results next to them.

    Each photo ``k`` gets ``k.prediction.json`` (label, confidence, probabilities, model name/version);
    the run also writes ``<incoming>_predictions/<run_label>.csv``. A photo with a result is never
    classified again, so a retried or repeated run does no double work.
    """
    from pipeline.adapters import storage

    bucket, prefix = storage.parse_s3_uri(incoming_uri)
    listing = storage.list_objects(incoming_uri, s3_client)
    done = {o.key[: -len(SIDECAR_SUFFIX)] for o in listing if o.key.endswith(SIDECAR_SUFFIX)}
    todo = [it for it in s3_items(incoming_uri, s3_client) if f"{prefix}{it.id}" not in done]
    if not todo:
        return {"classified": 0, "errors": 0, "model_version": "", "results": ""}
    model = load_model(model_uri)
    rows = list(predict_items(model, todo, tta))
    provenance = {
        "model_uri": model_uri,
        "model_name": model.name,
        "model_version": model.version,
        "model_run_id": model.run_id,
        "run": run_label,
    }
    for row in rows:
        record = {**row, **provenance}
        storage.put_bytes(
            bucket,
            f"{prefix}{row['id']}{SIDECAR_SUFFIX}",
            json.dumps(record, ensure_ascii=False, indent=1).encode("utf-8"),
            s3_client,
        )
    safe_label = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_label)
    results_key = f"{prefix}{RESULTS_DIR}{safe_label}.csv"
    storage.put_bytes(bucket, results_key, rows_to_csv_bytes([{**r, **provenance} for r in rows]), s3_client)
    failed = sum(1 for r in rows if r["error"])
    _logger.info(
        "batch: classified %d photos (%d errors) with %s version %s -> s3://%s/%s",
        len(rows),
        failed,
        model.name,
        model.version,
        bucket,
        results_key,
    )
    return {
        "classified": len(rows),
        "errors": failed,
        "model_version": model.version,
        "results": f"s3://{bucket}/{results_key}",
    }
