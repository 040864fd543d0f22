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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import f1_score
from tqdm import tqdm

from pipeline.core import checkpoints
from pipeline.core.config import Config
from pipeline.core.data import normalize_batch
from pipeline.core.errors import CheckpointError

_logger = logging.getLogger(__name__)


def autocast(cfg: Config, device: torch.device):
    if cfg.train.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_one_epoch(model, loader, criterion, optimizer, mixup, cfg, device, mean, std, frozen_bn, desc) -> dict:
    model.train()
    for bn in frozen_bn:
        bn.eval()
    total, seen, start = 0.0, 0, time.perf_counter()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    quiet = distributed and dist.get_rank() > 0
    bar = tqdm(loader, desc=desc, leave=False, mininterval=2, disable=True if quiet else None)
    for step, (x, y) in enumerate(bar):
        if cfg.train.max_train_batches and step >= cfg.train.max_train_batches:
            break
        x = normalize_batch(x.to(device), mean, std, cfg.train.channels_last)
        y = y.to(device)
        if mixup is not None and len(x) % 2 == 0:
            x, y = mixup(x, y)
        with autocast(cfg, device):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        seen += len(x)
        bar.set_postfix(loss=f"{total / seen:.3f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
    if distributed:  # every rank logs the global mean loss and counts all ranks' images
        sums = torch.tensor([total, float(seen)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, seen = sums[0].item(), int(sums[1].item())
    elapsed = time.perf_counter() - start
    return {"train_loss": total / max(seen, 1), "train_img_s": seen / max(elapsed, 1e-9), "train_images": seen}


@torch.no_grad()
def predict_logits(model, images: np.ndarray, cfg: Config, device, mean, std, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2)
        x = normalize_batch(x.to(device), mean, std, cfg.train.channels_last)
        with autocast(cfg, device):
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def validate(model, images, labels, cfg, device, mean, std) -> dict:
    if len(labels) == 0:
        return {"val_weighted_f1": float("nan")}
    pred = predict_logits(model, images, cfg, device, mean, std).argmax(1)
    return {"val_weighted_f1": float(f1_score(labels, pred, average="weighted", zero_division=0)),
            "val_accuracy": float((pred == np.asarray(labels)).mean())}


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
