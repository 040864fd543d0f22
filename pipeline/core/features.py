"""Frozen layers computed once: the cached output of a frozen prefix, per image and symmetry (torch only).

With ``model.freeze: all_but_last:N`` the layers before the last N stages never change (their BatchNorm
layers stay in eval mode), so their output is a fixed function of the image and its symmetry. Computing it
every epoch is most of a CPU epoch's work. ``train.cache_frozen`` computes it once for each of the symmetries
training can draw (:data:`pipeline.core.data.VARIANTS`) and trains the last stages on the cached maps.

The cache is keyed by content, never stale: one file per image, under a folder whose name hashes the backbone,
the frozen weights, the input size, the normalisation and the symmetries; the file name is the image's SHA-256.
New data pays the frozen layers only for the new images. Maps are stored as float16 (half the bytes); they
feed layers that train in float32.

    split = split_frozen(model, "all_but_last:2")     # None: this architecture has no known split
    feats = build_features(split.prefix, images, shas, variants, cache_dir, mean, std)   # N × V × C × H × W
    logits = split.tail(torch.from_numpy(feats[:, 0]).float())   # == model(images) up to float16 rounding
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.data import apply_variant, normalize_batch
from pipeline.core.io import save_npy_atomic

_logger = logging.getLogger(__name__)
STORE_DTYPE = np.float16


class _Tail(nn.Module):
    """The trainable end of an EfficientNet-style timm model, from a cached prefix output to logits."""

    def __init__(self, model: nn.Module, first_block: int):
        super().__init__()
        self.model = model  # shares parameters: training the tail trains the model that is saved
        self.first_block = first_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        for block in list(m.blocks)[self.first_block :]:
            x = block(x)
        return m.forward_head(m.bn2(m.conv_head(x)))


@dataclass
class FrozenSplit:
    prefix: nn.Module  # image → feature map; every parameter frozen
    tail: nn.Module  # feature map → logits; the trainable part (shares the model's parameters)


def split_frozen(model: nn.Module, freeze: str) -> FrozenSplit | None:
    """Cut ``model`` where ``freeze`` (``all_but_last:N``) ends the frozen layers; None where we cannot.

    Known layout: timm's EfficientNet family (``conv_stem``, ``bn1``, ``blocks``, ``conv_head``, ``bn2``), which
    covers efficientnet_lite*, tf_efficientnetv2_* and mobilenetv3's relatives that share the class.
    """
    if not freeze.startswith("all_but_last:"):
        return None
    if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        return None
    n = int(freeze.split(":")[1])
    blocks = list(model.blocks)
    first = len(blocks) - n
    if n < 1 or first < 0:
        return None
    prefix = nn.Sequential(model.conv_stem, model.bn1, *blocks[:first])
    if any(p.requires_grad for p in prefix.parameters()):
        return None  # not frozen after all: caching would freeze what should train
    return FrozenSplit(prefix.eval(), _Tail(model, first))


def prefix_key(prefix: nn.Module, backbone: str, size: int, mean: tuple, std: tuple, variants: list[int]) -> str:
    """Hash of everything a cached map depends on besides the image: weights, size, normalisation, symmetries."""
    h = hashlib.sha256(f"{backbone}|{size}|{tuple(mean)}|{tuple(std)}|{list(variants)}".encode())
    for name, t in prefix.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def _compute(
    prefix: nn.Module,
    images: np.ndarray,
    variants: list[int],
    mean: tuple,
    std: tuple,
    channels_last: bool,
    batch_size: int,
) -> np.ndarray:
    device = next(prefix.parameters()).device
    out = None
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        per_variant = []
        for v in variants:
            xv = normalize_batch(apply_variant(x, v).to(device), mean, std, channels_last)
            per_variant.append(prefix(xv).float().cpu().numpy().astype(STORE_DTYPE))
        batch = np.stack(per_variant, axis=1)  # B × V × C × H × W
        if out is None:
            out = np.empty((len(images), *batch.shape[1:]), dtype=STORE_DTYPE)
        out[i : i + len(batch)] = batch
    return out


def build_features(
    prefix: nn.Module,
    images: np.ndarray,
    shas: list[str],
    variants: list[int],
    key: str,
    cache_dir: Path | None,
    mean: tuple,
    std: tuple,
    channels_last: bool = False,
    batch_size: int = 32,
) -> np.ndarray:
    """N × V × C × H × W float16 maps of ``prefix`` for ``images`` (N × H × W × 3 uint8) under ``variants``.

    Images whose ``cache_dir/<key>/<sha>.npy`` exists are read; the rest are computed in batches and written
    (atomically). Without ``cache_dir`` everything is computed and nothing is kept.
    """
    prefix.eval()
    if len(shas) == 0:  # e.g. no val split
        return np.zeros((0, len(variants), 1, 1, 1), dtype=STORE_DTYPE)
    folder = cache_dir / key if cache_dir is not None else None
    todo = [i for i, sha in enumerate(shas) if folder is None or not (folder / f"{sha}.npy").exists()]
    fresh = _compute(prefix, images[todo], variants, mean, std, channels_last, batch_size) if todo else None
    if folder is not None and fresh is not None:
        for j, i in enumerate(todo):
            save_npy_atomic(folder / f"{shas[i]}.npy", fresh[j])
    _logger.info(
        "frozen layers: %d of %d images computed (x%d symmetries), %d from the cache %s",
        len(todo),
        len(shas),
        len(variants),
        len(shas) - len(todo),
        folder or "(none)",
    )
    if fresh is not None and len(todo) == len(shas):
        return fresh
    shape = fresh.shape[1:] if fresh is not None else np.load(folder / f"{shas[0]}.npy", mmap_mode="r").shape
    out = np.empty((len(shas), *shape), dtype=STORE_DTYPE)
    fresh_at = {i: j for j, i in enumerate(todo)}
    for i, sha in enumerate(shas):
        out[i] = fresh[fresh_at[i]] if i in fresh_at else np.load(folder / f"{sha}.npy")
    return out


class FeatureDataset(Dataset):
    """Items are ``(float16 C×H×W map, label)``: a random symmetry the class allows, drawn from the cache."""

    def __init__(
        self,
        features: np.ndarray,
        variants: list[int],
        labels: list[int],
        indices: list[int],
        allowed: list[tuple[int, ...]],
        seed: int = 0,
    ):
        self.features = features  # N × V × C × H × W, V in the order of ``variants``
        self.slot = {v: k for k, v in enumerate(variants)}
        self.labels = labels
        self.indices = list(indices)
        self.allowed = allowed  # per label: the symmetries it may be drawn in
        self.reseed(seed)

    def reseed(self, seed: int | list[int]) -> None:
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        label = self.labels[j]
        options = self.allowed[label]
        v = options[self.rng.integers(len(options))]
        return torch.from_numpy(np.array(self.features[j, self.slot[v]])), label

    def target_labels(self) -> list[int]:
        return [self.labels[j] for j in self.indices]


@torch.no_grad()
def tail_probs(
    tail: nn.Module,
    features: np.ndarray,
    variants: list[int],
    slots: list[int],
    device,
    channels_last: bool,
    batch_size: int = 128,
) -> np.ndarray:
    """Softmax of ``tail`` averaged over the cached symmetries ``slots`` (indices into ``variants``)."""
    tail.eval()
    total = None
    for k in slots:
        out = []
        for i in range(0, len(features), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(features[i : i + batch_size, k])).to(device).float()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(torch.softmax(tail(x).float(), dim=1).cpu().numpy())
        p = np.concatenate(out)
        total = p if total is None else total + p
    return total / len(slots)
