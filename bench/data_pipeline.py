"""Manifest + validation throughput: header probe, sha256, full decode + dHash and the GX suite, per image.

Runs on the installed ELPV files (2,624 real PNGs, 300x300) and on a synthetic set of 10,000 PNGs
(256x256 RGB noise + gradient, written once to a temp folder), without S3 (that is the ingest's network cost,
measured separately in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.adapters.storage import ObjectInfo
from pipeline.core.config import config_from_dict
from pipeline.stages.ingest import _describe
from pipeline.stages.validate import decode_table, run_expectations

N_SYNTH = int(os.environ.get("BENCH_SYNTH_IMAGES", "10000"))


def _synthetic(folder: Path, n: int) -> list[tuple[Path, str]]:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 200, 256, dtype=np.uint8)[None, :, None].repeat(256, 0).repeat(3, 2)
    out = []
    for i in range(n):
        cls = f"c{i % 19:02d}"
        fp = folder / cls / f"{i:05d}.png"
        fp.parent.mkdir(parents=True, exist_ok=True)
        arr = base + rng.integers(0, 50, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(arr).save(fp, compress_level=1)
        out.append((fp, cls))
    return out


def _throughput(files: list[tuple[Path, str]], raw_dir: Path) -> tuple[float, float, float, float]:
    """(manifest img/s, decode img/s, GX suite seconds, whole manifest+validate img/s)."""
    cfg = config_from_dict({"data": {"landing_uri": "s3://bench/x/"}})
    t0 = time.perf_counter()
    rows = [
        _describe(fp, fp.relative_to(raw_dir).as_posix(), cls, ObjectInfo(str(fp), "", fp.stat().st_size))
        for fp, cls in files
    ]
    t1 = time.perf_counter()
    table = decode_table(raw_dir, rows, cfg.validate.max_pixels)
    t2 = time.perf_counter()
    failures = run_expectations(cfg, table, None)
    t3 = time.perf_counter()
    assert not failures, "bench data must be valid"
    n = len(files)
    return n / (t1 - t0), n / (t2 - t1), t3 - t2, n / (t3 - t0)


def run() -> dict[str, str]:
    from devstack.demo_data import load_elpv_items

    items = load_elpv_items()
    elpv_root = items[0].path.parent.parent  # elpv_dataset/data; paths are images/cellNNNN.png
    elpv = [(i.path, "images") for i in items]
    out = {}
    for name, fn in (("ELPV", lambda: _throughput(elpv, elpv_root)), ("SYNTH", None)):
        if fn is None:
            with tempfile.TemporaryDirectory() as tmp:
                res = _throughput(_synthetic(Path(tmp), N_SYNTH), Path(tmp))
        else:
            res = fn()
        out.update(
            {
                f"MANIFEST_IMG_S_{name}": f"{res[0]:.0f}",
                f"DECODE_IMG_S_{name}": f"{res[1]:.0f}",
                f"GX_SUITE_SECONDS_{name}": f"{res[2]:.1f}",
                f"MANIFEST_VALIDATE_IMG_S_{name}": f"{res[3]:.0f}",
            }
        )
    out["SYNTH_IMAGES"] = str(N_SYNTH)
    return out
