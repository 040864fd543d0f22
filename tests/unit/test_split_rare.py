"""Rare classes: a total split policy, stratified bag resamples, and no near-duplicate spanning two classes."""

import dataclasses
import hashlib
import itertools
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import MIN_SPLIT_GROUPS, config_from_dict
from pipeline.core.data import bootstrap_indices
from pipeline.core.errors import ConfigError
from pipeline.stages.split import _unit, assign_splits
from pipeline.stages.validate import label_conflicts

pytestmark = pytest.mark.unit

N_CASES = 500


def _cfg(**split):
    return config_from_dict({"data": {"landing_uri": "s3://x/"}, "split": split})


def _hex(rng: np.random.Generator, n: int) -> str:
    return rng.bytes(n).hex()


def _random_class(rng: np.random.Generator, name: str, n_images: int) -> tuple[list[dict], int]:
    """``n_images`` rows of class ``name`` in a random number of duplicate groups; returns (rows, groups).

    Within a group each image after the first is linked to an earlier one by its bytes (exact duplicate), its
    dhash (near duplicate, other bytes) or both; links chain, so a group can hold several dhashes. Different
    groups share nothing.
    """
    n_groups = int(rng.integers(1, n_images + 1))
    group_of = np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, n_images - n_groups)])
    rows, seen = [], defaultdict(list)
    for i, g in enumerate(rng.permutation(group_of)):
        row = {"path": f"{name}/{i}.png", "class_name": name, "sha256": _hex(rng, 32), "dhash": _hex(rng, 8)}
        if seen[g]:
            earlier = seen[g][rng.integers(len(seen[g]))]
            link = rng.integers(3)  # 0: same bytes, 1: same dhash, 2: both
            if link in (0, 2):
                row["sha256"] = earlier["sha256"]
            if link in (1, 2):
                row["dhash"] = earlier["dhash"]
        seen[g].append(row)
        rows.append(row)
    return rows, n_groups


def _check_case(rows: list[dict], n_groups: dict[str, int], cfg) -> None:
    out, train_only = assign_splits(rows, cfg)
    assert len(out) == len(rows) and all(r["split"] in ("train", "val", "test") for r in out)
    # A picture's bytes or its dhash never sits on two sides of the split (within a class).
    for field in ("sha256", "dhash"):
        sides = defaultdict(set)
        for r in out:
            sides[(r["class_name"], r[field])].add(r["split"])
        assert all(len(s) == 1 for s in sides.values()), field
    group_splits = defaultdict(set)
    for r in out:
        group_splits[(r["class_name"], r["group"])].add(r["split"])
    assert all(len(s) == 1 for s in group_splits.values())  # every group in exactly one split
    per_class = defaultdict(Counter)
    for (c, _), (s,) in group_splits.items():
        per_class[c][s] += 1
    for c, g in n_groups.items():
        assert sum(per_class[c].values()) == g, (c, "groups merged or torn apart")
        if g < cfg.split.min_class_for_split:
            assert c in train_only and set(per_class[c]) == {"train"}, c
        else:
            t, v, tr = per_class[c]["test"], per_class[c]["val"], per_class[c]["train"]
            assert c not in train_only and t >= 1 and v >= 1 and tr > t and tr > g / 2, (c, g, t, v, tr)
    assert train_only == sorted(train_only)


def test_split_property_over_random_class_sizes_and_duplicates():
    """500 random datasets: 1-5 classes of 1-40 images, random exact and near duplicates, random fractions."""
    rng = np.random.default_rng(20240611)
    for case in range(N_CASES):
        tf, vf = (float(x) for x in rng.uniform(0.02, 0.45, 2))
        cfg = _cfg(
            seed=int(rng.integers(1000)),
            test_fraction=tf,
            val_fraction=vf,
            min_class_for_split=int(rng.choice([MIN_SPLIT_GROUPS, 7, 10])),
        )
        rows, n_groups = [], {}
        for c in range(int(rng.integers(1, 6))):
            class_rows, n_groups[f"c{c}"] = _random_class(rng, f"c{c}", int(rng.integers(1, 41)))
            rows += class_rows
        rows = [rows[i] for i in rng.permutation(len(rows))]
        try:
            _check_case(rows, n_groups, cfg)
        except Exception as exc:
            raise AssertionError(
                f"case {case} of {N_CASES} (sizes {n_groups}, tf={tf:.2f}, vf={vf:.2f}): {type(exc).__name__}: {exc}"
            ) from exc


def _shas_with_u_below(bound: float, seed: int, count: int) -> list[str]:
    """``count`` sha256 values whose group draws ``u < bound``: every one hashes into test."""
    shas = (hashlib.sha256(f"img{i}".encode()).hexdigest() for i in itertools.count())
    return list(itertools.islice((s for s in shas if _unit(seed, s) < bound), count))


@pytest.mark.parametrize("n_groups", [3, 5, 6])
def test_class_whose_every_group_hashes_into_test_does_not_crash(n_groups):
    """Formerly a bare StopIteration: all groups drew ``u < test_fraction``, leaving no train group for val.

    Built with the old default ``min_class_for_split=3`` (config validation now refuses it, a hand-built
    Config does not): the split's own floor of five groups keeps the 3-group class train-only.
    """
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, min_class_for_split=3))
    shas = _shas_with_u_below(cfg.split.test_fraction, cfg.split.seed, n_groups)
    rows = [{"path": f"반점/{i}.png", "class_name": "반점", "sha256": s, "dhash": s[:16]} for i, s in enumerate(shas)]
    out, train_only = assign_splits(rows, cfg)
    counts = Counter(r["split"] for r in out)
    if n_groups < MIN_SPLIT_GROUPS:
        assert train_only == ["반점"] and counts == {"train": n_groups}
    else:
        assert train_only == [] and counts == {"test": 1, "val": 1, "train": n_groups - 2}


def test_split_moves_a_trained_group_out_of_train_only_when_the_class_was_capped():
    """New groups in a split class never pull an old train group into test/val, unless more than half of the
    class had hashed into test and val (the train-majority cap), which the new groups relax."""
    rng = np.random.default_rng(7)
    cfg = _cfg(min_class_for_split=MIN_SPLIT_GROUPS)
    tf, vf = cfg.split.test_fraction, cfg.split.val_fraction
    for case in range(N_CASES):
        n_old = int(rng.integers(MIN_SPLIT_GROUPS, 30))
        rows = [
            {"path": f"a/{i}.png", "class_name": "a", "sha256": _hex(rng, 32), "dhash": _hex(rng, 8)}
            for i in range(n_old + int(rng.integers(1, 20)))
        ]
        before = {r["path"]: r["split"] for r in assign_splits(rows[:n_old], cfg)[0]}
        after = {r["path"]: r["split"] for r in assign_splits(rows, cfg)[0]}
        capped = sum(_unit(cfg.split.seed, r["sha256"]) < tf + vf for r in rows[:n_old]) > (n_old - 1) // 2
        pulled = [p for p, s in before.items() if s == "train" and after[p] != "train"]
        assert not pulled or capped, f"case {case} of {N_CASES}: {pulled}"


def test_min_class_for_split_below_the_floor_is_refused_with_its_key():
    with pytest.raises(ConfigError, match=r"split\.min_class_for_split must be >= 5"):
        _cfg(min_class_for_split=3)


def test_near_duplicates_of_two_classes_never_share_a_group():
    """Defensive: validate quarantines them, but should one slip through, the split keeps the classes apart."""
    cfg = _cfg(min_class_for_split=MIN_SPLIT_GROUPS)
    rows = [
        {"path": f"{c}/{i}.png", "class_name": c, "sha256": f"{c}{i}", "dhash": f"{c}{i}"}
        for c in ("a", "b")
        for i in range(10)
    ]
    rows.append({"path": "b/twin.png", "class_name": "b", "sha256": "twin", "dhash": "a3"})  # near-dup of a/3
    out, _ = assign_splits(rows, cfg)
    group = {r["path"]: r["group"] for r in out}
    assert group["b/twin.png"] != group["a/3.png"]
    assert Counter(r["class_name"] for r in out if r["group"] == group["b/twin.png"]) == {"b": 1}


# --- stratified bootstrap -------------------------------------------------------------------------------------


def test_stratified_bootstrap_keeps_every_class_and_its_count_for_every_seed():
    labels = [0] * 700 + [1] * 1 + [2] * 2 + [3] * 9 + [4] * 40  # a class of one train image (반점 in train)
    labels = [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]
    want = Counter(labels)
    for seed in range(N_CASES):
        idx = bootstrap_indices(labels, seed)
        assert len(idx) == len(labels)
        assert Counter(labels[i] for i in idx) == want, f"seed {seed} of {N_CASES}"
    assert bootstrap_indices(labels, 3) == bootstrap_indices(labels, 3)  # deterministic per seed
    assert bootstrap_indices(labels, 3) != bootstrap_indices(labels, 4)
    assert len(set(bootstrap_indices(labels, 3))) < len(labels)  # with replacement: a real resample


# --- validate: label conflicts ---------------------------------------------------------------------------------


def test_near_duplicate_under_another_class_is_quarantined_with_a_reason():
    table = pd.DataFrame(
        {
            "source_key": ["s3/a/1.png", "s3/b/1.png", "s3/a/2.png", "s3/a/3.png", "s3/c/9.png", "s3/d/9.png"],
            "class_name": ["a", "b", "a", "a", "c", "d"],
            "sha256": ["x1", "y1", "x2", "x3", "same", "same"],
            "dhash": ["d1", "d1", "d2", "d2", "d9", "d9"],
        }
    )
    ok = pd.Series([True] * len(table), index=table.index)
    out = label_conflicts(table, ok)
    assert out[0] == "label conflict: near-duplicate of s3/b/1.png (same difference hash) under class b"
    assert out[1] == "label conflict: near-duplicate of s3/a/1.png (same difference hash) under class a"
    assert 2 not in out and 3 not in out  # near-duplicates within one class are the split's groups, not conflicts
    assert out[4] == "label conflict: same bytes as s3/d/9.png" and out[5] == "label conflict: same bytes as s3/c/9.png"
    ok[1] = False  # b/1 already failed another rule: a/1 no longer conflicts with anything that trains
    assert 0 not in label_conflicts(table, ok)
