"""Out-of-sample probabilities from the bag: which member saw which train image, and who may score it.

Each bag member trains on ``member_indices`` (deterministic from the split and its seed): with ``bag.folds`` all
folds but its own, so every train image is out of sample for exactly one member; with ``bag.bootstrap`` a
resample, and a train image missing from a member's resample is *out of bag* for that member: its probabilities there are
out-of-sample, the input cleanlab needs. Val images are never trained on (they only pick the best epoch), so every
member may score them. A train image in every member's resample has no out-of-sample probabilities in the bag; we
leave it *unscored* and count it rather than fall back to in-sample probabilities, which a model that memorised the
label would make look clean (docs/decisions/0006-label-issues.md).

A near-duplicate counts as seen: ``split`` puts identical and near-identical pictures of one class in one duplicate
group, and a member that trained on one copy has, in effect, trained on all of them.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.data import member_indices

SOURCE_VAL = "val:all_members"  # never trained on: every member scores it
SOURCE_UNSCORED = "unscored:in_every_member"  # no member left it out: no out-of-sample probabilities here


def in_bag_matrix(
    train_labels: list[int],
    seeds: tuple[int, ...] | list[int],
    bootstrap: bool,
    groups: list[str] | None = None,
    folds: bool = False,
) -> np.ndarray:
    """``[i, m]`` is True when member ``seeds[m]`` trained on train image ``i`` (or on a duplicate of it).

    Mirrors the train stage (``member_indices``): ``folds``, a bootstrap resample, or every image.
    ``groups`` (duplicate-group id per train image) spreads "seen" to the group; folds never split a group.
    """
    n = len(train_labels)
    ids = list(groups) if groups is not None else [str(i) for i in range(n)]
    seen = np.zeros((n, len(seeds)), dtype=bool)
    for m, seed in enumerate(seeds):
        seen[member_indices(train_labels, ids, seeds, seed, bootstrap, folds), m] = True
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} duplicate-group ids for {n} train images")
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        for members in by_group.values():
            if len(members) > 1:
                seen[members] = seen[members].any(axis=0)
    return seen


def train_sources(seen: np.ndarray, member_names: list[str]) -> list[str]:
    """Per train image, where its probabilities come from: ``oob:<members that never saw it>`` or unscored."""
    out = []
    for row in seen:
        unseen = [name for name, s in zip(member_names, row) if not s]
        out.append("oob:" + "+".join(unseen) if unseen else SOURCE_UNSCORED)
    return out


def out_of_bag_probs(member_probs: list[np.ndarray], seen: np.ndarray) -> np.ndarray:
    """Mean over the members that did not see each image; rows no member left out are NaN (unscored).

    ``member_probs[m]`` is member ``m``'s N×K probabilities on the train images, ``seen`` the N×M in-bag matrix.
    """
    stacked = np.stack(member_probs, axis=1).astype(np.float64)  # N × M × K
    if stacked.shape[:2] != seen.shape:
        raise ValueError(f"probabilities for {stacked.shape[:2]} images × members, in-bag matrix {seen.shape}")
    unseen = ~seen
    count = unseen.sum(axis=1)
    total = (stacked * unseen[:, :, None]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = total / count[:, None]
    probs[count == 0] = np.nan
    return probs
