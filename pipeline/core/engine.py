"""The training loop's parts: one epoch, validation, logits, resume checkpoints (torch only).

``train_one_epoch`` and ``validate`` are what the train stage (``pipeline.stages.train``) calls each epoch;
both run on the batch's device and under bf16 autocast when ``train.amp`` says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import f1_score
from tqdm import tqdm

from pipeline.core import checkpoints
from pipeline.core.config import Config
from pipeline.core.data import apply_variant, normalize_batch
from pipeline.core.devices import autocast
from pipeline.core.errors import CheckpointError

_logger = logging.getLogger(__name__)
POSTFIX_EVERY = 10  # steps between progress-bar updates: each one waits for the device to finish its queue


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_step(model, x, y, criterion, optimizer, mixup, cfg, device, mean, std) -> torch.Tensor:
    """One optimiser step on a uint8 NCHW batch ``x``; returns the detached loss, still on ``device``.

    Everything is made on ``device``: the batch goes there as uint8 (a quarter of the float bytes) and is
    normalised there; CutMix's mixed targets and the loss's one-hot targets follow the batch.
    """
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:  # images; cached frozen-layer maps (train.cache_frozen) arrive as float16
        x = normalize_batch(x, mean, std, cfg.train.channels_last)
    else:
        x = x.float()
        x = x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x
    y = y.to(device, non_blocking=True)
    if mixup is not None and len(x) % 2 == 0:
        x, y = mixup(x, y)
    with autocast(device, cfg.train.amp):
        loss = criterion(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(model, loader, criterion, optimizer, mixup, cfg, device, mean, std, frozen_bn, desc) -> dict:
    model.train()
    for bn in frozen_bn:
        bn.eval()
    # The loss sum stays on the device (float64, as Python's float was), read only every POSTFIX_EVERY steps.
    total, seen, start = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    quiet = distributed and dist.get_rank() > 0
    bar = tqdm(loader, desc=desc, leave=False, mininterval=2, disable=True if quiet else None)
    for step, (x, y) in enumerate(bar):
        if cfg.train.max_train_batches and step >= cfg.train.max_train_batches:
            break
        loss = train_step(model, x, y, criterion, optimizer, mixup, cfg, device, mean, std)
        total += loss.double() * len(x)
        seen += len(x)
        if step % POSTFIX_EVERY == 0 and not bar.disable:
            bar.set_postfix(loss=f"{total.item() / seen:.3f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
    if distributed:  # every rank logs the global mean loss and counts all ranks' images
        sums = torch.stack([total, total.new_tensor(float(seen))])
        dist.all_reduce(sums)
        total, seen = sums[0], int(sums[1].item())
    elapsed = time.perf_counter() - start
    return {"train_loss": total.item() / max(seen, 1), "train_img_s": seen / max(elapsed, 1e-9), "train_images": seen}


@torch.no_grad()
def predict_logits(model, images: np.ndarray, cfg: Config, device, mean, std, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i : i + batch_size])).permute(0, 3, 1, 2)
        x = normalize_batch(x.to(device), mean, std, cfg.train.channels_last)
        with autocast(device, cfg.train.amp):
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def validate(model, inputs, labels, cfg, device, mean, std, cached: bool = False) -> dict:
    """Weighted F1 and accuracy on val, averaged over the symmetries serving averages over.

    ``inputs`` is ``(arrays, views)``: N × H × W × 3 uint8 images, or (``cached``) the frozen layers' cached maps
    N × V × C × H × W whose V axis holds ``views`` in order, and ``model`` is then the trainable tail.
    """
    arrays, views = inputs
    if len(labels) == 0:
        return {"val_weighted_f1": float("nan")}
    if cached:
        from pipeline.core.features import tail_probs

        probs = tail_probs(model, arrays, views, list(range(len(views))), device, cfg.train.channels_last)
    else:
        probs = sum(
            torch.softmax(
                torch.from_numpy(
                    predict_logits(model, apply_variant(np.asarray(arrays), v, "hwc"), cfg, device, mean, std)
                ),
                1,
            ).numpy()
            for v in views
        )
    pred = probs.argmax(1)
    return {
        "val_weighted_f1": float(f1_score(labels, pred, average="weighted", zero_division=0)),
        "val_accuracy": float((pred == np.asarray(labels)).mean()),
    }


def none_if_nan(x: float) -> float | None:
    return None if x != x else x


def run_key(cfg: Config, split_fp: Path, seed: int) -> str:
    h = hashlib.sha256(Path(split_fp).read_bytes())
    h.update(cfg.params_hash().encode())
    h.update(str(seed).encode())
    return h.hexdigest()[:16]


def load_resume_checkpoint(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        ckpt = checkpoints.load(path, "resume checkpoint")
        if not isinstance(ckpt, dict) or not {"run_key", "model", "optimizer", "scheduler", "state"} <= set(ckpt):
            raise CheckpointError(f"resume checkpoint {path} lacks the model/optimizer/scheduler/state entries")
    except CheckpointError as exc:
        # Refused, never half-loaded; kept aside (nothing deleted) and training restarts from epoch 0.
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, aside)
        _logger.warning("refusing %s; moved it to %s; training from epoch 0", exc, aside.name)
        return None
    if ckpt.get("run_key") != key:
        _logger.info("checkpoint %s belongs to other inputs; starting fresh", path)
        return None
    return ckpt
