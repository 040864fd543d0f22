"""A landing prefix and a registered version holding a ``label_issues`` report, made without training.

The relabel loop's integration test and ``devstack/label_studio_roundtrip.py`` start from this: three classes
(Korean, one with a comma; one folder NFD-decomposed as DACON archives arrive), real PNGs in SeaweedFS, and an
MLflow run with the artifacts ``register`` logs for real (``reports/label_issues.csv`` in the stage's columns,
``split.csv``, the ``data.landing_uri`` param), registered as a version with alias ``champion``.
"""

from __future__ import annotations

import io
import tempfile
import unicodedata
from pathlib import Path

CLASSES = ["곰팡이", "오염", "창틀,문틀수정"]
NFD_CLASS = "곰팡이"  # its landing folder is NFD-decomposed; the reports name it in NFC, as ingest does
# (path, given, suggested, flagged): three suspects, the rest clean
# File names differ across classes (곰팡이/000.png, 오염/100.png, …), so a move never meets a namesake by chance.
SUSPECTS = [
    ("오염/101.png", "오염", "곰팡이"),
    ("창틀,문틀수정/200.png", "창틀,문틀수정", "오염"),
    ("곰팡이/002.png", "곰팡이", "창틀,문틀수정"),
]


def png(seed: int, tint: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
    arr[..., tint % 3] += 150
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def landing_key(prefix: str, path: str) -> str:
    """The key a report path has in the fixture's landing prefix (the NFD class folder stays NFD)."""
    cls, name = path.split("/", 1)
    folder = unicodedata.normalize("NFD", cls) if cls == NFD_CLASS else cls
    return f"{prefix}{folder}/{name}"


def seed_landing(bucket: str, prefix: str, per_class: int = 3) -> list[str]:
    """``per_class`` PNGs per class under ``s3://bucket/prefix``; returns the report paths (NFC)."""
    from pipeline.adapters import storage

    paths = []
    for c_i, cls in enumerate(CLASSES):
        for i in range(per_class):
            path = f"{cls}/{c_i * 100 + i:03d}.png"
            storage.put_bytes(bucket, landing_key(prefix, path), png(c_i * 100 + i, c_i))
            paths.append(path)
    return paths


def report_rows(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """``label_issues.csv`` and ``split.csv`` rows for ``paths``: the suspects flagged and ranked first."""
    flagged = {p: (g, s) for p, g, s in SUSPECTS}
    issues, split = [], []
    ranked = [p for p, _, _ in SUSPECTS if p in paths] + [p for p in paths if p not in flagged]
    for rank, path in enumerate(ranked, 1):
        given = path.split("/", 1)[0]
        suggested = flagged.get(path, (given, given))[1]
        issues.append(
            {
                "rank": rank,
                "path": path,
                "split": "train",
                "given_class": given,
                "suggested_class": suggested,
                "label_quality": round(0.01 * rank, 6),
                "issue": path in flagged,
                "p_given": round(0.01 * rank, 6),
                "source": "oob:member_0",
            }
        )
        split.append({"path": path, "class_name": given, "sha256": f"sha-{rank}", "split": "train", "group": path})
    return issues, split


def seed_version(model_name: str, landing_uri: str, paths: list[str]) -> str:
    """An MLflow run with the report artifacts, registered as a version of ``model_name`` aliased champion."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.core.io import write_csv
    from pipeline.stages.label_issues import FIELDS
    from pipeline.stages.split import SPLIT_FIELDS

    issues, split = report_rows(paths)
    mlflow.set_experiment("review-fixture")
    with mlflow.start_run(run_name="review-fixture") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_param("data.landing_uri", landing_uri)
        write_csv(Path(tmp) / "reports" / "label_issues.csv", issues, FIELDS)
        write_csv(Path(tmp) / "split.csv", split, SPLIT_FIELDS)
        mlflow.log_artifacts(str(Path(tmp) / "reports"), artifact_path="reports")
        mlflow.log_artifact(str(Path(tmp) / "split.csv"))
    client = MlflowClient()
    try:
        client.create_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        pass  # already there: a new version of it
    mv = client.create_model_version(model_name, f"runs:/{run.info.run_id}/reports", run_id=run.info.run_id)
    client.set_registered_model_alias(model_name, "champion", mv.version)
    return str(mv.version)
