"""A generated stand-in for the DACON wallpaper-defect data, shaped like the real archive (which cannot be fetched here).

    from devstack.dacon_fixture import write_dacon_tree; write_dacon_tree(Path("/tmp/dacon"), scale=0.25, floor=28)

Writes ``train/<class>/<file>`` with DACON's 19 real class names (one with a comma), the seven tiny classes at their
real sizes (반점 3, 틈새과다 5, 가구수정 12, 녹오염 14, 이음부불량 17, 울음 22, 창틀,문틀수정 27) and the others scaled down;
every third class folder NFD-decomposed, as macOS zip tools write Korean names; RGB and RGBA PNGs and JPEGs of
several sizes. Plus ``test/NNN.png``, ``test.csv`` (``id,img_path``) and ``sample_submission.csv`` (``id,label``).
Each class has its own hue and stripe direction, so a model can learn them apart; pixel noise keeps every image
distinct (no accidental duplicates). Used by the DACON-shaped end-to-end test and ``make gpu-check``.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

# Real train counts (public write-ups; they sum to 3,457), in LabelEncoder (sorted) order.
DACON_COUNTS = {
    "가구수정": 12,
    "걸레받이수정": 307,
    "곰팡이": 145,
    "꼬임": 210,
    "녹오염": 14,
    "들뜸": 54,
    "면불량": 99,
    "몰딩수정": 130,
    "반점": 3,
    "석고수정": 57,
    "오염": 595,
    "오타공": 142,
    "울음": 22,
    "이음부불량": 17,
    "창틀,문틀수정": 27,
    "터짐": 162,
    "틈새과다": 5,
    "피스": 51,
    "훼손": 1405,
}
TINY = 27  # classes up to this size keep their real size


def class_counts(scale: float = 0.0, floor: int = 10) -> dict[str, int]:
    """Tiny classes (≤ 27 images) at their real size; each larger class at ``scale`` × its real size, at least
    ``floor``. ``scale=0.25, floor=28`` gives 1,003 images in the real order of sizes; ``(0, 10)`` 220 for CPU tests."""
    return {c: n if n <= TINY else max(floor, round(n * scale)) for c, n in DACON_COUNTS.items()}


def _image(rng: np.random.Generator, class_idx: int, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    hue = class_idx / len(DACON_COUNTS)
    base = np.array([np.sin(2 * np.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)]) * 170
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx if class_idx % 2 else yy) * (0.3 + 0.05 * (class_idx % 5))) * 25
    # A random low-frequency shading per image: it decides the difference hash, so no two pictures of different
    # classes look alike to validate's near-duplicate rule (the stripes, the class signal, average out at 9x8).
    shade = (
        np.asarray(
            Image.fromarray(rng.integers(0, 255, (5, 5), dtype=np.uint8)).resize((w, h), Image.BILINEAR),
            dtype=np.float64,
        )
        * 0.8
    )
    arr = base[None, None, :] + stripes[..., None] + shade[..., None] + rng.integers(0, 45, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, kind: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    im = Image.fromarray(arr, "RGB")
    if kind == "rgba":
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(np.full(arr.shape[:2], 230, np.uint8)))
        im.save(buf, format="PNG")
        return buf.getvalue(), "png"
    if kind == "jpeg":
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "jpg"
    im.save(buf, format="PNG")
    return buf.getvalue(), "png"


def train_files(scale: float = 0.0, floor: int = 10, seed: int = 0) -> dict[str, bytes]:
    """``{"<class folder>/<file>": bytes}``; every third class folder name is NFD-decomposed."""
    rng = np.random.default_rng(seed)
    kinds = ("png", "rgba", "jpeg")
    sizes = ((48, 48), (64, 40), (40, 72), (56, 56))
    out = {}
    for ci, (name, n) in enumerate(class_counts(scale, floor).items()):
        folder = unicodedata.normalize("NFD", name) if ci % 3 == 0 else name
        for i in range(n):
            data, ext = _encode(_image(rng, ci, sizes[i % len(sizes)]), kinds[(ci + i) % len(kinds)])
            out[f"{folder}/{i:04d}.{ext}"] = data
    return out


def write_dacon_tree(
    root: Path, scale: float = 0.0, floor: int = 10, test_images: int = 20, seed: int = 0
) -> dict[str, int]:
    """Write the archive layout under ``root``; returns per-class train counts (NFC names)."""
    for rel, data in train_files(scale, floor, seed).items():
        fp = root / "train" / rel
        fp.parent.mkdir(parents=True, exist_ok=True)
        fp.write_bytes(data)
    rng = np.random.default_rng(seed + 1)
    (root / "test").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(test_images):
        data, _ = _encode(_image(rng, i % len(DACON_COUNTS), (48, 48)), "png")
        (root / "test" / f"{i:03d}.png").write_bytes(data)
        rows.append({"id": f"TEST_{i:03d}", "img_path": f"./test/{i:03d}.png"})
    _write_csv(root / "test.csv", rows, ["id", "img_path"])
    _write_csv(root / "sample_submission.csv", [{"id": r["id"], "label": "0"} for r in rows], ["id", "label"])
    return class_counts(scale, floor)


def upload_train(s3, bucket: str, prefix: str, scale: float = 0.0, floor: int = 10, seed: int = 0) -> int:
    """Put the generated ``train/`` tree under ``s3://bucket/prefix`` (folder names as generated, NFD included)."""
    files = train_files(scale, floor, seed)
    for rel, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}{rel}", Body=data)
    return len(files)


def _write_csv(fp: Path, rows: list[dict], fields: list[str]) -> None:
    with open(fp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
