"""Stage ``split``: a seeded, leakage-safe train/val/test split, stable when new data lands, written to a file.

    python -m pipeline split --params params.yaml --validated data/validated.csv --split data/split.csv

Identical bytes (sha256) and near-identical pictures (equal difference hash) form one group and
always land in the same split, so an augmented or re-saved copy can never sit on both sides.
Classes with fewer than ``split.min_class_for_split`` images go to train only (DACON has classes of
3 and 5 images); the report lists them. Split first, augment after (augmentation happens in training).
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.io import read_csv, write_csv, write_json

_logger = logging.getLogger(__name__)
SPLIT_FIELDS = ["path", "class_name", "sha256", "split", "group"]


def duplicate_groups(rows: list[dict[str, str]]) -> list[int]:
    """Union-find over equal sha256 or equal dhash; returns a group id per row."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        for key in (("sha", row["sha256"]), ("dh", row.get("dhash", ""))):
            if not key[1]:
                continue
            if key in first_by:
                parent[find(i)] = find(first_by[key])
            else:
                first_by[key] = i
    return [find(i) for i in range(len(rows))]


def _unit(seed: int, key: str) -> float:
    """A fixed pseudo-random number in [0, 1) for a group: depends only on the seed and the group's own bytes."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / 16 ** 15


def assign_splits(rows: list[dict[str, str]], cfg: Config) -> tuple[list[dict[str, str]], list[str]]:
    """Return rows with ``split`` and ``group`` filled in, and the classes kept train-only.

    Stable under new data: a group's split depends only on its own content hash (``u < test_fraction`` → test,
    ``u < test + val`` → val, else train), so images already split never move when more land. That keeps the
    gate honest: the champion is re-scored on a test split it never trained on. Each splittable class still
    gets at least one test and one val group (the lowest ``u`` not yet taken) and keeps one train group.
    """
    groups = duplicate_groups(rows)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    key_of = {g: min(rows[i]["sha256"] for i in idxs) for g, idxs in members.items()}
    u = {g: _unit(cfg.split.seed, key_of[g]) for g in members}
    by_class: dict[str, list[int]] = defaultdict(list)
    for g, idxs in members.items():
        by_class[rows[idxs[0]]["class_name"]].append(g)
    tf, vf = cfg.split.test_fraction, cfg.split.val_fraction
    split_of: dict[int, str] = {}
    train_only = []
    for class_name in sorted(by_class):
        gs = sorted(by_class[class_name], key=lambda g: (u[g], key_of[g]))
        n = sum(len(members[g]) for g in gs)
        if n < cfg.split.min_class_for_split or len(gs) < 3:
            train_only.append(class_name)
            split_of.update({g: "train" for g in gs})
            continue
        for g in gs:
            split_of[g] = "test" if u[g] < tf else "val" if u[g] < tf + vf else "train"
        for need in ("test", "val"):
            if tf + vf > 0 and not any(split_of[g] == need for g in gs):
                split_of[next(g for g in gs if split_of[g] == "train")] = need
        if not any(split_of[g] == "train" for g in gs):
            split_of[gs[-1]] = "train"
    out = [dict(row, split=split_of[groups[i]], group=key_of[groups[i]][:12]) for i, row in enumerate(rows)]
    return out, train_only


def run_split(cfg: Config, validated_fp: Path, split_fp: Path, report_fp: Path) -> dict:
    rows = sorted(read_csv(validated_fp), key=lambda r: r["path"])
    out, train_only = assign_splits(rows, cfg)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in out:
        counts[row["split"]][row["class_name"]] += 1
    report = {"seed": cfg.split.seed, "rows": len(out), "train_only_classes": train_only,
              "groups_with_duplicates": len(out) - len({r["group"] for r in out}),
              "counts": {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}}
    write_csv(split_fp, out, SPLIT_FIELDS)
    write_json(report_fp, report)  # a DVC metrics file: escaped JSON, or DVC calls the Korean names binary
    _logger.info("split: %s", {s: sum(c.values()) for s, c in report["counts"].items()})
    return report
