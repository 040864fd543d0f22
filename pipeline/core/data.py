"""Training data: split file → decoded-image cache → dataset with per-class flips → weighted sampler → loader.

The cache holds every image once, decoded, normalised to RGB and resized to the model's input
size as uint8 (N×H×W×3). It is saved as ``.npy`` keyed by the file hashes and the size, so bag
members and later epochs reuse it instead of decoding PNGs again; that keeps the model busy.

Under DDP (``torchrun``) every process draws the same seeded sample order and takes its own slice of each
global batch (:class:`ShardedBatchSampler`), so one step of all processes sees the single-process batch.

Flips draw from the dataset's own numpy generator. In the main process the train stage reseeds it every epoch;
each DataLoader worker reseeds its copy from the seed torch hands that worker (:func:`seed_worker`), so workers,
epochs and DDP ranks draw different flips, and a rerun draws the same ones.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler, get_worker_info

from pipeline.core.errors import ConfigError
from pipeline.core.images import decode_rgb, resize_uint8
from pipeline.core.io import read_csv, save_npy_atomic

_logger = logging.getLogger(__name__)

# A published per-class flip policy for the DACON classes (orientation matters for some defects).
DACON_FLIPS = {
    **{c: "both" for c in ("곰팡이", "녹오염", "면불량", "오염", "피스", "반점", "석고수정", "울음", "오타공", "훼손")},
    **{c: "h" for c in ("가구수정", "걸레받이수정", "꼬임", "들뜸", "몰딩수정", "창틀,문틀수정", "터짐", "틈새과다")},
    "이음부불량": "v",
}


@dataclass(frozen=True)
class SplitData:
    class_names: tuple[str, ...]
    paths: dict[str, list[str]]  # split -> relative paths
    labels: dict[str, list[int]]  # split -> label indices
    sha256: dict[str, list[str]]
    groups: dict[str, list[str]]  # duplicate-group id per image (a split file without groups: the path)


def load_split(split_fp: Path) -> SplitData:
    rows = read_csv(split_fp)
    class_names = tuple(sorted({r["class_name"] for r in rows}))
    index = {c: i for i, c in enumerate(class_names)}
    paths, labels, shas, groups = ({s: [] for s in ("train", "val", "test")} for _ in range(4))
    for r in rows:
        paths[r["split"]].append(r["path"])
        labels[r["split"]].append(index[r["class_name"]])
        shas[r["split"]].append(r["sha256"])
        groups[r["split"]].append(r.get("group") or r["path"])
    return SplitData(class_names, paths, labels, shas, groups)


def build_cache(raw_dir: Path, paths: list[str], shas: list[str], size: int, cache_dir: Path | None) -> np.ndarray:
    """Decode and resize ``paths`` once; reuse ``cache_dir/<key>.npy`` when it exists."""
    key = hashlib.sha256(("\n".join(shas) + f"|{size}").encode()).hexdigest()[:20]
    cache_fp = cache_dir / f"images-{size}-{key}.npy" if cache_dir else None
    if cache_fp is not None and cache_fp.exists():
        return np.load(cache_fp, mmap_mode="r")
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, rel in enumerate(paths):
        out[i] = resize_uint8(decode_rgb(str(raw_dir / rel)), size)
    if cache_fp is not None:
        save_npy_atomic(cache_fp, out)
    return out


# The 8 symmetries of a square image (the dihedral group D4), numbered by bits: 4 = transpose (first), 1 = flip
# left-right, 2 = flip up-down. 3 is a 180° rotation, 5 and 6 the two 90° rotations.
N_VARIANTS = 8
# What each train.flip_default / flip_policy value lets a class be turned into (training draws one at random).
VARIANTS = {"none": (0,), "h": (0, 1), "v": (0, 2), "both": (0, 1, 2, 3), "d4": tuple(range(N_VARIANTS))}


def apply_variant(x: torch.Tensor | np.ndarray, variant: int, layout: str = "chw"):
    """Symmetry ``variant`` (0..7) of an image or batch whose last axes are ``layout`` (``chw`` or ``hwc``)."""
    h, w = (-2, -1) if layout == "chw" else (-3, -2)
    if isinstance(x, np.ndarray):
        if variant & 4:
            x = np.swapaxes(x, h, w)
        if variant & 1:
            x = np.flip(x, w)
        if variant & 2:
            x = np.flip(x, h)
        return x
    if variant & 4:
        x = x.transpose(h, w)
    if variant & 1:
        x = x.flip(w)
    if variant & 2:
        x = x.flip(h)
    return x


def tta_variants(flips: list[str]) -> list[int]:
    """The symmetries every class allows: what test-time augmentation may average over without knowing the class."""
    common = set(range(N_VARIANTS))
    for policy in flips:
        common &= set(VARIANTS[policy])
    return sorted(common)


class CachedImageDataset(Dataset):
    """Items are ``(uint8 CHW tensor, label)``; a random symmetry the class allows (``VARIANTS``) when training."""

    def __init__(
        self,
        images: np.ndarray,
        labels: list[int],
        indices: list[int] | None = None,
        flips: list[str] | None = None,
        seed: int = 0,
    ):
        self.images = images
        self.labels = labels
        self.indices = list(range(len(labels))) if indices is None else list(indices)
        self.flips = flips  # per label: a key of VARIANTS; None = no augmentation
        self.reseed(seed)

    def reseed(self, seed: int | list[int]) -> None:
        """Start a new flip stream; ``seed`` is an int or a list of ints (numpy mixes them into one seed)."""
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        img = torch.from_numpy(np.array(self.images[j])).permute(2, 0, 1)
        label = self.labels[j]
        if self.flips is not None:
            allowed = VARIANTS[self.flips[label]]
            img = apply_variant(img, allowed[self.rng.integers(len(allowed))])
        return img, label

    def target_labels(self) -> list[int]:
        return [self.labels[j] for j in self.indices]


def flips_per_label(class_names: tuple[str, ...], policy: dict[str, str], default: str) -> list[str]:
    return [policy.get(c, DACON_FLIPS.get(c, default)) for c in class_names]


def bootstrap_indices(labels: list[int], seed: int) -> list[int]:
    """A stratified bootstrap resample of ``range(len(labels))``, deterministic per seed.

    Each class is resampled with replacement within itself, to its own count, so every class is in every
    bag member's resample. A plain bootstrap leaves out a class of one train image with p ≈ 1/e ≈ 0.37,
    and that member never sees it in training. Indices come grouped by class; the sampler shuffles them.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    out: list[int] = []
    for y in sorted(by_class):
        idxs = by_class[y]
        out.extend(idxs[k] for k in rng.integers(0, len(idxs), size=len(idxs)))
    return out


def fold_of_groups(labels: list[int], groups: list[str], k: int) -> list[int]:
    """A fold (0..k-1) per image: stratified by class, a duplicate group never split, deterministic.

    Within each class the groups are ordered by a hash of their id and dealt round-robin, so each fold holds about
    1/k of every class and a re-run (or ``reproduce``) deals the same folds.
    """
    first: dict[tuple[int, str], int] = {}
    for y, g in zip(labels, groups):
        first.setdefault((y, g), len(first))
    by_class: dict[int, list[str]] = {}
    for y, g in first:
        by_class.setdefault(y, []).append(g)
    fold_of: dict[tuple[int, str], int] = {}
    for y, gs in by_class.items():
        ordered = sorted(gs, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
        for rank, g in enumerate(ordered):
            fold_of[(y, g)] = rank % k
    return [fold_of[(y, g)] for y, g in zip(labels, groups)]


def member_indices(
    labels: list[int], groups: list[str], seeds: tuple[int, ...] | list[int], seed: int, bootstrap: bool, folds: bool
) -> list[int]:
    """The train-split indices bag member ``seed`` trains on (``bag.folds``, ``bag.bootstrap`` or all of them).

    ``folds``: member ``seeds.index(seed)`` leaves out its own fold of ``len(seeds)`` (:func:`fold_of_groups`),
    so every train image is out of sample for exactly one member. One seed: nothing to hold out, all images.
    """
    if folds and len(seeds) > 1:
        if seed not in seeds:
            raise ConfigError(
                f"member {seed} is not one of bag.seeds {list(seeds)}: with bag.folds its fold is its "
                "position in that list"
            )
        held_out = list(seeds).index(seed)
        return [i for i, f in enumerate(fold_of_groups(labels, groups, len(seeds))) if f != held_out]
    if bootstrap:
        return bootstrap_indices(labels, seed)
    return list(range(len(labels)))


def create_sampler(labels: list[int], power: float, seed: int) -> WeightedRandomSampler | None:
    """Weighted random sampler with weight = class_count ** -power (power 1 ≈ uniform over classes)."""
    if power == 0:
        return None
    counts = Counter(labels)
    weights = torch.tensor([counts[y] ** -power for y in labels], dtype=torch.double)
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=gen)


class ShardedBatchSampler(Sampler[list[int]]):
    """One DDP process's share of each global batch of ``batch_size`` indices drawn from ``sampler``.

    Every process iterates the same ``sampler`` (seeded alike on all ranks) and cuts its order into global
    batches exactly as a single-process ``DataLoader(batch_size=batch_size)`` would; rank ``rank`` gets the
    positions ``rank::world_size`` of each. The ranks' shards of one step are disjoint and together are the
    single-process batch. A trailing partial batch (kept only without ``drop_last``) is cut to a multiple of
    ``world_size`` so that all ranks take the same number of equal steps.
    """

    def __init__(self, sampler: Sized, batch_size: int, drop_last: bool, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} processes")
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == self.batch_size:
                yield batch[self.rank :: self.world_size]
                batch = []
        keep = len(batch) - len(batch) % self.world_size
        if keep and not self.drop_last:
            yield batch[:keep][self.rank :: self.world_size]

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest >= self.world_size and not self.drop_last else 0)


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """``worker_init_fn``: give this DataLoader worker its own flip stream, from the seed torch gave the worker.

    Without it every worker draws from a copy of the same numpy generator, so worker k's i-th image gets the
    same flips as worker 0's i-th. torch seeds worker ``w`` with ``base_seed + w``, where ``base_seed`` comes from
    the loader's generator, which the train stage seeds per (member, epoch): distinct across workers and epochs,
    and the same on a rerun. ``rank`` keeps DDP processes apart: their loaders share one generator seed, because
    they must draw one sample order.
    """
    info = get_worker_info()
    reseed = getattr(info.dataset, "reseed", None)
    if reseed is not None:
        reseed([info.seed, rank])


def train_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler | None,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """One epoch's training loader: ``sampler`` (or a shuffle seeded with ``seed``), batches of ``batch_size``.

    ``world_size`` > 1 (DDP): ``batch_size`` is the global batch; this rank gets its ``batch_size //
    world_size`` share of each one (:class:`ShardedBatchSampler`), from the same order as a single process.
    Worker processes (``num_workers`` > 0) reseed the dataset's flips with :func:`seed_worker`.
    """
    gen = torch.Generator().manual_seed(seed)
    drop_last = len(dataset) > batch_size
    workers = {
        "num_workers": num_workers,
        "generator": gen,
        "pin_memory": pin_memory,
        "worker_init_fn": functools.partial(seed_worker, rank=rank) if num_workers else None,
    }
    if world_size == 1:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, shuffle=sampler is None, drop_last=drop_last, **workers
        )
    # The same generator object as the single-process loader's: the DataLoader draws its worker base seed
    # from it before the shuffle does, so the shuffle order comes out identical.
    order = sampler if sampler is not None else RandomSampler(dataset, generator=gen)
    return DataLoader(
        dataset, batch_sampler=ShardedBatchSampler(order, batch_size, drop_last, rank, world_size), **workers
    )


def normalize_batch(x: torch.Tensor, mean: tuple, std: tuple, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW → float, normalised with the model's mean/std (done per batch: cheaper than per image).

    mean/std are made on the batch's device, as timm's ``PrefetchLoader`` does: CPU constants would make a CUDA
    batch fail ("Expected all tensors to be on the same device").
    """
    x = x.float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
