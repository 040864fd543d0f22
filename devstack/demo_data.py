"""Lay the installed ELPV dataset out as class folders in the landing bucket.

ELPV (PyPI ``elpv-dataset``) holds 2,624 real solar-cell electroluminescence crops labelled with a
defect probability {0, 1/3, 2/3, 1} and a cell type {mono, poly}. Each (type, probability) pair
becomes one class folder named for what it means, e.g. ``mono_p100`` = mono cell, certainly defective::

    python -m devstack demo-data --landing-uri s3://landing/elpv/

Idempotent: objects already present with the same size are not uploaded again. A prefix that holds
anything else (your own data) is left alone: nothing is uploaded there.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.adapters import storage

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoItem:
    path: Path  # the PNG inside the installed package
    class_name: str


def elpv_class_name(probability: float, cell_type: str) -> str:
    """``(2/3, "poly") -> "poly_p067"``: type, then defect probability in percent."""
    return f"{cell_type}_p{round(probability * 100):03d}"


def load_elpv_items(limit_per_class: int = 0) -> list[DemoItem]:
    """Read ELPV's labels.csv; ``limit_per_class`` > 0 keeps the first N files of each class."""
    import elpv_dataset

    data_dir = Path(elpv_dataset.__file__).parent / "data"
    items: list[DemoItem] = []
    seen: dict[str, int] = {}
    for line in (data_dir / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        rel, prob, cell_type = line.split()
        name = elpv_class_name(float(prob), cell_type)
        if limit_per_class and seen.get(name, 0) >= limit_per_class:
            continue
        seen[name] = seen.get(name, 0) + 1
        items.append(DemoItem(data_dir / rel, name))
    return items


def upload_demo_data(landing_uri: str, limit_per_class: int = 0) -> dict[str, int]:
    """Upload ELPV under ``landing_uri``; returns counts of uploaded and skipped objects."""
    bucket, prefix = storage.parse_s3_uri(landing_uri)
    storage.check_bucket(bucket)
    existing = {o.key: o.size for o in storage.list_objects(landing_uri)}
    items = {f"{prefix}{i.class_name}/{i.path.name}": i for i in load_elpv_items(limit_per_class)}
    foreign = sorted(set(existing) - set(items))
    if foreign:
        _logger.info("%s already holds other data (e.g. %s); not adding ELPV", landing_uri, foreign[0])
        return {"uploaded": 0, "skipped": len(existing)}
    missing = [(k, i) for k, i in items.items() if existing.get(k) != i.path.stat().st_size]
    with ThreadPoolExecutor(max_workers=8) as pool:  # S3 PUTs are latency-bound
        list(pool.map(lambda ki: storage.upload_file(ki[1].path, bucket, ki[0]), missing))
    uploaded, skipped = len(missing), len(items) - len(missing)
    _logger.info("demo data at %s: %d uploaded, %d already there", landing_uri, uploaded, skipped)
    return {"uploaded": uploaded, "skipped": skipped}
