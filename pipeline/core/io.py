"""Small file helpers every layer uses: UTF-8 CSV read/atomic write, streaming SHA-256, escaped JSON.

JSON that DVC reads as metrics must be ASCII (``ensure_ascii=True``): DVC's text check calls a file with UTF-8
bytes "binary" and refuses it (see ../shared/FACTS.md). :func:`write_json` writes escaped JSON, which every
JSON reader turns back into the same Korean text.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def replace_synced(fh, tmp: Path, path: Path) -> None:
    """Flush and fsync the open temp file ``fh``, rename it over ``path``, fsync the folder.

    Without the fsyncs a power cut after the rename can leave a zero-length ``path`` where a good file was.
    """
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for reading: the rename itself is done
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Write atomically (temp file + rename) so a killed stage never leaves half a CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fh = open(tmp, "w", newline="", encoding="utf-8")
    writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    replace_synced(fh, tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text written atomically (temp file + rename): a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fh = open(tmp, "w", encoding="utf-8")
    fh.write(text)
    replace_synced(fh, tmp, path)


def save_npy_atomic(path: Path, array) -> None:
    """``numpy.save`` through a temp file, fsynced and renamed (the decoded-image and frozen-layer caches)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fh = open(tmp, "wb")
    np.save(fh, array)
    replace_synced(fh, tmp, path)


def write_json(path: Path, obj) -> None:
    """Indented, ASCII-escaped JSON written atomically (safe for DVC metrics holding any class name)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=True) + "\n")
