"""Stage ``split``: a seeded, leakage-safe train/val/test split, stable when new data lands, written to a file.

    python -m pipeline split --params params.yaml --validated data/validated.csv --split data/split.csv

Identical bytes (sha256) and near-identical pictures (equal difference hash) of one class form one
group and always land in the same split, so an augmented or re-saved copy can never sit on both sides.
Classes with fewer than ``split.min_class_for_split`` groups go to train only (DACON has classes of
3 and 5 images); the report lists them. A split class keeps at least one test and one val group and
more than half of its groups in train (docs/decisions/0008-rare-classes.md). Split first, augment
after (augmentation happens in training).

``--exclusions data/label_exclusions.csv`` (stage ``label_exclusions``, ``data.exclude_label_issues``): the
images the champion's label-issue report flagged leave train and val *after* the split is assigned, so no other
image changes split. A row is dropped only when both its path and its sha256 match a listed image: a relabelled
(moved to another class folder) or re-saved image comes back. Test rows are never dropped: the gate keeps scoring
on the same test split. Nothing is deleted; the report counts what left.
"""

from __future__ import annotations

import hashlib
import logging
from bisect import bisect_left
from collections import defaultdict
from pathlib import Path

from pipeline.core.config import MIN_SPLIT_GROUPS, Config
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_csv, write_csv, write_json

_logger = logging.getLogger(__name__)
SPLIT_FIELDS = ["path", "class_name", "sha256", "split", "group"]


def duplicate_groups(rows: list[dict[str, str]]) -> list[int]:
    """Union-find over equal sha256 or equal dhash within a class; returns a group id per row.

    Keys carry the class, so a group never spans two classes: validate quarantines such images, and
    should one slip through, filing it under one class would train the other's picture with a wrong label.
    """
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by: dict[tuple[str, str, str], int] = {}
    for i, row in enumerate(rows):
        for kind, value in (("sha", row["sha256"]), ("dh", row.get("dhash", ""))):
            if not value:
                continue
            key = (kind, row["class_name"], value)
            if key in first_by:
                parent[find(i)] = find(first_by[key])
            else:
                first_by[key] = i
    return [find(i) for i in range(len(rows))]


def _unit(seed: int, key: str) -> float:
    """A fixed pseudo-random number in [0, 1) for a group: depends only on the seed and the group's own bytes."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / 16**15


def held_out_counts(sorted_u: list[float], test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """(test, val) group counts of one splittable class, given its groups' ``u`` in ascending order.

    The hash rule alone puts ``u < test_fraction`` in test and ``u < test + val`` in val: both are prefixes
    of the sorted groups, so counts describe the split. The counts are clamped so that test and val hold at
    least one group each and train more than half; an unclamped class is exactly the hash rule, and a clamp
    only moves the groups nearest to a boundary.
    """
    n = len(sorted_u)
    if n < MIN_SPLIT_GROUPS:
        raise ValueError(f"a class of {n} groups is too small to split (at least {MIN_SPLIT_GROUPS})")
    most_held = (n - 1) // 2  # train keeps a strict majority
    held = min(max(bisect_left(sorted_u, test_fraction + val_fraction), 2), most_held)
    test = min(max(bisect_left(sorted_u, test_fraction), 1), held - 1)
    return test, held - test


def assign_splits(rows: list[dict[str, str]], cfg: Config) -> tuple[list[dict[str, str]], list[str]]:
    """Return rows with ``split`` and ``group`` filled in, and the classes kept train-only.

    Stable under new data: a group's split depends only on its own content hash (``u < test_fraction`` → test,
    ``u < test + val`` → val, else train), so images already split never move when more land. That keeps the
    gate honest: the champion is re-scored on a test split it never trained on. Two exceptions, both in small
    classes: a class that reaches ``split.min_class_for_split`` groups starts to be split (its groups so far were
    train), and a class with more than half its groups hashed into test and val gives the highest-``u`` of them
    to train until it grows (see :func:`held_out_counts`).
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
    # Config validation refuses a lower value; the floor also makes a hand-built Config total.
    min_groups = max(cfg.split.min_class_for_split, MIN_SPLIT_GROUPS)
    split_of: dict[int, str] = {}
    train_only = []
    for class_name in sorted(by_class):
        gs = sorted(by_class[class_name], key=lambda g: (u[g], key_of[g]))
        if len(gs) < min_groups:
            train_only.append(class_name)
            split_of.update({g: "train" for g in gs})
            continue
        n_test, n_val = held_out_counts([u[g] for g in gs], cfg.split.test_fraction, cfg.split.val_fraction)
        for rank, g in enumerate(gs):
            split_of[g] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out = [dict(row, split=split_of[groups[i]], group=key_of[groups[i]][:12]) for i, row in enumerate(rows)]
    return out, train_only


def drop_excluded(rows: list[dict[str, str]], exclusions: list[dict[str, str]]) -> tuple[list[dict[str, str]], dict]:
    """``rows`` (split assigned) less the train/val rows whose (path, sha256) an exclusion lists; and the counts.

    Matching needs both: the same path with other bytes (re-saved, fixed) or the same bytes under another path
    (moved to its corrected class folder) is a different image now, and stays. An exclusion without a sha256
    matches nothing. Test rows always stay (the gate's test split must stay comparable between versions).
    """
    listed = {(e["path"], e["sha256"]) for e in exclusions if e.get("path") and e.get("sha256")}
    kept, dropped = [], defaultdict(int)
    matched = set()
    for row in rows:
        key = (row["path"], row["sha256"])
        if key in listed:
            matched.add(key)
            if row["split"] in ("train", "val"):
                dropped[row["split"]] += 1
                continue
            dropped["test_kept"] += 1
        kept.append(row)
    sources = sorted({e.get("source_version", "") for e in exclusions if e.get("source_version")})
    counts = {
        "listed": len(exclusions),
        "dropped_train": dropped["train"],
        "dropped_val": dropped["val"],
        "kept_in_test": dropped["test_kept"],
        "not_matched": len(exclusions) - len(matched),
        "source_versions": sources,
    }
    return kept, counts


def run_split(
    cfg: Config, validated_fp: Path, split_fp: Path, report_fp: Path, exclusions_fp: Path | None = None
) -> dict:
    rows = sorted(read_csv(validated_fp), key=lambda r: r["path"])
    out, train_only = assign_splits(rows, cfg)
    if cfg.data.exclude_label_issues and (exclusions_fp is None or not exclusions_fp.exists()):
        raise PipelineError(
            f"data.exclude_label_issues is true but there is no exclusion list "
            f"({exclusions_fp or 'none given'}): run stage label_exclusions first"
        )
    exclusions = read_csv(exclusions_fp) if exclusions_fp is not None else []
    out, excluded = drop_excluded(out, exclusions)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in out:
        counts[row["split"]][row["class_name"]] += 1
    report = {
        "seed": cfg.split.seed,
        "rows": len(out),
        "min_class_for_split": cfg.split.min_class_for_split,
        "train_only_classes": train_only,
        "groups_with_duplicates": len(out) - len({r["group"] for r in out}),
        "excluded": excluded,
        "counts": {s: dict(sorted(c.items())) for s, c in sorted(counts.items())},
    }
    write_csv(split_fp, out, SPLIT_FIELDS)
    write_json(report_fp, report)  # a DVC metrics file: escaped JSON, or DVC calls the Korean names binary
    _logger.info("split: %s", {s: sum(c.values()) for s, c in report["counts"].items()})
    if exclusions:
        _logger.info(
            "split: label exclusions from %s: %d listed, %d left train, %d left val, %d kept in test, "
            "%d not in this data (moved, relabelled or changed)",
            ", ".join(excluded["source_versions"]),
            excluded["listed"],
            excluded["dropped_train"],
            excluded["dropped_val"],
            excluded["kept_in_test"],
            excluded["not_matched"],
        )
    if train_only:
        _logger.info(
            "split: train-only (fewer than split.min_class_for_split=%d groups, not scored on test): %s",
            cfg.split.min_class_for_split,
            train_only,
        )
    return report
