"""Stage ``split``: a seeded, stratified, leakage-safe train/val/test split written to a file.

    python -m pipeline split --params params.yaml --validated data/validated.csv --split data/split.csv

Identical bytes (sha256) and near-identical pictures (equal difference hash) form one group and
always land in the same split, so an augmented or re-saved copy can never sit on both sides.
Classes with fewer than ``split.min_class_for_split`` images go to train only (DACON has classes of
3 and 5 images); the report lists them. Split first, augment after (augmentation happens in training).
"""
from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path

from pipeline.config import Config
from pipeline.ingest import read_csv, write_csv

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


def assign_splits(rows: list[dict[str, str]], cfg: Config) -> tuple[list[dict[str, str]], list[str]]:
    """Return rows with ``split`` and ``group`` filled in, and the classes kept train-only."""
    groups = duplicate_groups(rows)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_class: dict[str, list[int]] = defaultdict(list)
    for g, idxs in members.items():
        by_class[rows[idxs[0]]["class_name"]].append(g)
    rng = random.Random(cfg.split.seed)
    split_of: dict[int, str] = {}
    train_only = []
    for class_name in sorted(by_class):
        gs = sorted(by_class[class_name])
        rng.shuffle(gs)
        n = sum(len(members[g]) for g in gs)
        if n < cfg.split.min_class_for_split or len(gs) < 3:
            train_only.append(class_name)
            split_of.update({g: "train" for g in gs})
            continue
        want = {"test": max(1, round(n * cfg.split.test_fraction)), "val": max(1, round(n * cfg.split.val_fraction))}
        taken = {"test": 0, "val": 0}
        for g in gs:
            target = next((s for s in ("test", "val") if taken[s] < want[s]), "train")
            split_of[g] = target
            taken[target] = taken.get(target, 0) + len(members[g])
    out = [dict(row, split=split_of[groups[i]], group=str(groups[i])) for i, row in enumerate(rows)]
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
    report_fp.parent.mkdir(parents=True, exist_ok=True)
    report_fp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _logger.info("split: %s", {s: sum(c.values()) for s, c in report["counts"].items()})
    return report
