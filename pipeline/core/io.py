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


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Write atomically (temp file + rename) so a killed stage never leaves half a CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text written atomically (temp file + rename): a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Indented, ASCII-escaped JSON written atomically (safe for DVC metrics holding any class name)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=True) + "\n")
