"""Data-arrival detection: fingerprint a landing prefix, wait until it is stable, decide whether it is new.

Pure functions plus one loop; the Airflow DAG ``defect_data_watch`` wires them to an S3 hook, the Asset's state
store (the durable "last processed" fingerprint, ``orchestration.only_new_listing``) and an Asset outlet.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from pipeline.adapters.storage import ObjectInfo

_logger = logging.getLogger(__name__)


def listing_fingerprint(objects: list[ObjectInfo]) -> str:
    """Order-independent hash of keys, ETags and sizes (folder markers ignored)."""
    lines = sorted(f"{o.key}\t{o.etag}\t{o.size}" for o in objects if not (o.key.endswith("/") and o.size == 0))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def wait_until_stable(
    list_fn: Callable[[], list[ObjectInfo]],
    settle_seconds: float,
    max_checks: int,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, int] | None:
    """Fingerprint, wait ``settle_seconds``, fingerprint again; ``(fingerprint, count)`` once two agree.

    Returns None when the prefix kept changing for ``max_checks`` windows (an upload still in progress).
    """
    objects = list_fn()
    before = listing_fingerprint(objects)
    for _ in range(max_checks):
        sleep(settle_seconds)
        objects = list_fn()
        now = listing_fingerprint(objects)
        if now == before:
            return now, sum(1 for o in objects if not o.key.endswith("/"))
        _logger.info(
            "landing prefix still changing (%s -> %s); waiting %.0fs more", before[:12], now[:12], settle_seconds
        )
        before = now
    return None


def stable_listing(
    uri: str, s3_client, settle_seconds: float, max_checks: int, exclude: Callable[[str], bool] | None = None
) -> dict | None:
    """What the watch DAGs' first task returns: ``{"fingerprint", "objects"}`` once the prefix is stable, else None.

    ``exclude(key relative to the prefix)`` drops objects that must not count as new data (our own outputs).
    """
    from pipeline.adapters import storage

    _, prefix = storage.parse_s3_uri(uri)

    def listing() -> list[ObjectInfo]:
        objects = storage.list_objects(uri, s3_client)
        return [o for o in objects if not (exclude and exclude(o.key[len(prefix) :]))]

    found = wait_until_stable(listing, settle_seconds, max_checks)
    return None if found is None else {"fingerprint": found[0], "objects": found[1]}
