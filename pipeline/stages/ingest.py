"""Stage ``ingest``: mirror ``s3://bucket/prefix/<class>/<file>`` into ``data/raw/`` incrementally.

    python -m pipeline ingest --params params.yaml --raw-dir data/raw \
        --manifest data/manifest.csv --rejects data/ingest_rejects.csv

Only new or changed objects (by ETag and size) are downloaded; files whose object vanished are
deleted. Class folder names are NFC-normalised (DACON archives arrive NFD-decomposed). Unsafe keys
are refused and listed with a reason in the rejects file, which validation folds into the quarantine.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.adapters import storage
from pipeline.core.config import Config
from pipeline.core.images import read_header
from pipeline.core.io import read_csv, sha256_file, write_csv

_logger = logging.getLogger(__name__)

MANIFEST_FIELDS = [
    "path",
    "class_name",
    "sha256",
    "bytes",
    "width",
    "height",
    "mode",
    "format",
    "header_error",
    "source_key",
    "etag",
]
REJECT_FIELDS = ["source_key", "reason"]


MAX_NAME_BYTES = 240  # a file system name is at most 255 bytes, and a download goes to ".<name>.part" first


def safe_relative_key(rel: str) -> tuple[str, str] | str:
    """Return ``(class_name, file_name)`` NFC-normalised for a key below the prefix, or a refusal reason."""
    if not rel:
        return "empty key"
    unprintable = next((ch for ch in rel if not ch.isprintable()), None)
    if unprintable is not None:  # controls, bidi overrides, zero-width and line separators, odd spaces
        return f"unprintable character U+{ord(unprintable):04X} in key (control, format, separator or space)"
    if rel.startswith("/") or "\\" in rel:
        return "absolute or backslash path in key"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'.', '..' or empty path segment in key"
    if len(parts) == 1:
        return "object directly under the prefix (no class folder)"
    if len(parts) > 2:
        return "nested folder below the class folder"
    class_name, file_name = (unicodedata.normalize("NFC", p) for p in parts)
    if any(len(p.encode()) > MAX_NAME_BYTES for p in (class_name, file_name)):
        return f"class or file name longer than {MAX_NAME_BYTES} bytes (the file system's limit)"
    if file_name.startswith("."):
        return "hidden file"
    return class_name, file_name


def fingerprint(rows: list[dict[str, str]]) -> str:
    """Order-independent dataset fingerprint: sha256 over sorted ``class/sha256`` pairs."""
    lines = sorted(f"{r['class_name']}\t{r['sha256']}" for r in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _describe(path: Path, rel: str, class_name: str, obj: storage.ObjectInfo) -> dict[str, str]:
    row = {
        "path": rel,
        "class_name": class_name,
        "sha256": sha256_file(path),
        "bytes": str(path.stat().st_size),
        "width": "",
        "height": "",
        "mode": "",
        "format": "",
        "header_error": "",
        "source_key": obj.key,
        "etag": obj.etag,
    }
    try:
        info = read_header(str(path))
        row.update(width=str(info.width), height=str(info.height), mode=info.mode, format=info.format)
    except Exception as exc:  # not an image at all: validation quarantines it with this reason
        row["header_error"] = str(exc)  # read_header's reason never names the file
    return row


def run_ingest(cfg: Config, raw_dir: Path, manifest_fp: Path, rejects_fp: Path) -> dict[str, int | str]:
    """Sync the landing prefix into ``raw_dir``; write the manifest and the rejects list."""
    bucket, prefix = storage.parse_s3_uri(cfg.data.landing_uri)
    storage.check_bucket(bucket)
    objects = storage.list_objects(cfg.data.landing_uri)
    previous = {r["source_key"]: r for r in read_csv(manifest_fp)}
    rows: list[dict[str, str]] = []
    rejects: list[dict[str, str]] = []
    taken: dict[str, str] = {}
    to_fetch: list[tuple[int, storage.ObjectInfo, str, str]] = []
    for obj in sorted(objects, key=lambda o: o.key):
        if obj.key.endswith("/") and obj.size == 0:
            continue  # a folder marker, not a file
        parsed = safe_relative_key(obj.key[len(prefix) :])
        if isinstance(parsed, str):
            rejects.append({"source_key": obj.key, "reason": parsed})
            continue
        class_name, file_name = parsed
        rel = f"{class_name}/{file_name}"
        if rel in taken:
            rejects.append({"source_key": obj.key, "reason": f"same path after NFC normalisation as {taken[rel]}"})
            continue
        if obj.size > cfg.validate.max_bytes:
            rejects.append({"source_key": obj.key, "reason": f"object of {obj.size} bytes > validate.max_bytes"})
            continue
        taken[rel] = obj.key
        old = previous.get(obj.key)
        if old and old["etag"] == obj.etag and old["bytes"] == str(obj.size) and (raw_dir / rel).exists():
            rows.append(old)
        else:
            rows.append({})  # filled in by the download below, keeping the listing order
            to_fetch.append((len(rows) - 1, obj, rel, class_name))

    def fetch(item: tuple[int, storage.ObjectInfo, str, str]) -> tuple[int, dict[str, str]]:
        idx, obj, rel, class_name = item
        fetched = storage.download(bucket, obj.key, raw_dir / rel)
        if fetched.etag != obj.etag:
            _logger.warning("%s changed while syncing; keeping the copy we downloaded", obj.key)
        return idx, _describe(raw_dir / rel, rel, class_name, fetched)

    with ThreadPoolExecutor(max_workers=8) as pool:  # S3 GETs are latency-bound
        for idx, row in pool.map(fetch, to_fetch):
            rows[idx] = row
    downloaded = len(to_fetch)
    raw_dir.mkdir(parents=True, exist_ok=True)  # even when empty: validation then says "no images"
    removed = _remove_vanished(raw_dir, {r["path"] for r in rows})
    write_csv(manifest_fp, rows, MANIFEST_FIELDS)
    write_csv(rejects_fp, rejects, REJECT_FIELDS)
    summary = {
        "objects": len(objects),
        "files": len(rows),
        "downloaded": downloaded,
        "removed": removed,
        "rejected": len(rejects),
        "fingerprint": fingerprint(rows),
    }
    _logger.info("ingest %s: %s", cfg.data.landing_uri, summary)
    return summary


def _remove_vanished(raw_dir: Path, keep: set[str]) -> int:
    removed = 0
    if not raw_dir.exists():
        return 0
    for path in sorted(raw_dir.rglob("*")):
        if path.is_file() and path.relative_to(raw_dir).as_posix() not in keep:
            path.unlink()
            removed += 1
    for folder in sorted((p for p in raw_dir.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed
