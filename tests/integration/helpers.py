"""Small real images and uploads for integration tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: int = 48, mode: str = "RGB", tint: tuple = (0, 0, 0)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 80, (size, size, 3), dtype=np.uint8) + np.array(tint, dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


MODEL = "test-defect-classifier"  # registry.model_name of profiles/test.yaml
TINTS = {"crack": (150, 0, 0), "mold": (0, 150, 0), "stain": (0, 0, 150)}
# The 19 DACON wallpaper-defect classes, one with a comma: what every name-handling test must survive.
DACON_CLASSES = [
    "가구수정",
    "걸레받이수정",
    "곰팡이",
    "꼬임",
    "녹오염",
    "들뜸",
    "면불량",
    "몰딩수정",
    "반점",
    "석고수정",
    "오염",
    "오타공",
    "울음",
    "이음부불량",
    "창틀,문틀수정",
    "터짐",
    "틈새과다",
    "피스",
    "훼손",
]


def upload_tiny_dataset(s3, bucket: str, prefix: str, per_class: int = 8) -> int:
    """3 classes whose colour tells them apart, ``per_class`` distinct PNGs each."""
    n = 0
    for c_i, (cls, tint) in enumerate(TINTS.items()):
        for i in range(per_class):
            s3.put_object(Bucket=bucket, Key=f"{prefix}{cls}/{i:03d}.png", Body=png_bytes(c_i * 1000 + i, tint=tint))
            n += 1
    return n


def write_tiny_split(ws, per_class: int, val_per_class: int = 0) -> None:
    """``ws/raw/<class>/<i>.png`` + ``ws/split.csv`` for the train stage: the first ``val_per_class`` images of each
    class are validation, the rest train (no ingest, validate or split stage needed)."""
    from pipeline.core.io import write_csv
    from pipeline.stages.split import SPLIT_FIELDS

    rows = []
    for c_i, (cls, tint) in enumerate(TINTS.items()):
        for i in range(per_class):
            fp = ws / "raw" / cls / f"{i}.png"
            fp.parent.mkdir(parents=True, exist_ok=True)
            fp.write_bytes(png_bytes(c_i * 100 + i, tint=tint))
            rows.append(
                {
                    "path": f"{cls}/{i}.png",
                    "class_name": cls,
                    "sha256": f"{c_i}-{i}",
                    "split": "val" if i < val_per_class else "train",
                    "group": f"{c_i}-{i}",
                }
            )
    write_csv(ws / "split.csv", rows, SPLIT_FIELDS)


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    """Poll ``predicate`` until it returns something truthy (returned); fail naming ``what`` after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
