"""Stage ``train``: fine-tune one bag member (a timm backbone) on the train split.

    python -m pipeline train --params params.yaml --split data/split.csv --raw-dir data/raw \
        --member 0 --out-dir models/member_0

Imports no Airflow, MLflow or DVC: this runs on a bare GPU box with torch and timm. Recipe: focal
loss with label smoothing, CutMix (timm's Mixup), weighted random sampling, AdamW + ExponentialLR,
early stopping and best-checkpoint selection on validation weighted F1. Each epoch ends with an
atomic checkpoint; a killed run restarted with the same inputs continues from it. Every epoch
re-seeds from (member seed, epoch), so a resumed run follows the same path as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import (CachedImageDataset, bootstrap_indices, build_cache, create_sampler, flips_per_label,
                           load_split, normalize_batch)
from pipeline.losses import FocalLoss
from pipeline.models import create_model

_logger = logging.getLogger(__name__)


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_one_epoch(model, loader, criterion, optimizer, mixup, cfg, device, mean, std, frozen_bn, desc) -> dict:
    model.train()
    for bn in frozen_bn:
        bn.eval()
    total, seen, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, mininterval=2, disable=None)
    for step, (x, y) in enumerate(bar):
        if cfg.train.max_train_batches and step >= cfg.train.max_train_batches:
            break
        x = normalize_batch(x.to(device), mean, std, cfg.train.channels_last)
        y = y.to(device)
        if mixup is not None and len(x) % 2 == 0:
            x, y = mixup(x, y)
        with _autocast(cfg, device):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        seen += len(x)
        bar.set_postfix(loss=f"{total / seen:.3f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": total / max(seen, 1), "train_img_s": seen / max(elapsed, 1e-9), "train_images": seen}


@torch.no_grad()
def predict_logits(model, images: np.ndarray, cfg: Config, device, mean, std, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2)
        x = normalize_batch(x.to(device), mean, std, cfg.train.channels_last)
        with _autocast(cfg, device):
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def validate(model, images, labels, cfg, device, mean, std) -> dict:
    if len(labels) == 0:
        return {"val_weighted_f1": float("nan")}
    pred = predict_logits(model, images, cfg, device, mean, std).argmax(1)
    return {"val_weighted_f1": float(f1_score(labels, pred, average="weighted", zero_division=0)),
            "val_accuracy": float((pred == np.asarray(labels)).mean())}


def _none_if_nan(x: float) -> float | None:
    return None if x != x else x


def _run_key(cfg: Config, split_fp: Path, seed: int) -> str:
    h = hashlib.sha256(Path(split_fp).read_bytes())
    h.update(cfg.params_hash().encode())
    h.update(str(seed).encode())
    return h.hexdigest()[:16]


def _save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file is refused, never half-loaded
        _logger.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return None
    if ckpt.get("run_key") != key:
        _logger.info("checkpoint %s belongs to other inputs; starting fresh", path)
        return None
    return ckpt


def run_train(cfg: Config, split_fp: Path, raw_dir: Path, member: int, out_dir: Path,
              cache_dir: Path | None = None, ckpt_dir: Path | None = None, name: str = "") -> dict:
    """Train bag member ``member`` (its seed); write model.pt, meta.json and history.json to ``out_dir``.

    ``name`` names the checkpoint and log lines (default ``member_<member>``; the backbone stage passes
    ``backbone_<timm name>``).
    """
    name = name or f"member_{member}"
    seed = member
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _seed_all(seed)
    split = load_split(split_fp)
    model, weights_source = create_model(cfg.model.backbone, len(split.class_names), cfg.model.weights,
                                         cfg.model.freeze)
    frozen_bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and not any(p.requires_grad for p in m.parameters())]
    import timm.data

    data_cfg = timm.data.resolve_model_data_config(model)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = cfg.model.img_size
    train_imgs = build_cache(raw_dir, split.paths["train"], split.sha256["train"], size, cache_dir)
    val_imgs = build_cache(raw_dir, split.paths["val"], split.sha256["val"], size, cache_dir)
    n_train = len(split.labels["train"])
    indices = bootstrap_indices(n_train, seed) if cfg.bag.bootstrap else list(range(n_train))
    flips = flips_per_label(split.class_names, cfg.train.flip_policy, cfg.train.flip_default)
    dataset = CachedImageDataset(train_imgs, split.labels["train"], indices, flips, seed)
    criterion = FocalLoss(cfg.train.focal_gamma, cfg.train.label_smoothing)
    mixup = None
    if cfg.train.cutmix_prob > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=cfg.train.cutmix_alpha, prob=cfg.train.cutmix_prob,
                      label_smoothing=cfg.train.label_smoothing, num_classes=len(split.class_names))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.train.lr_gamma)

    key = _run_key(cfg, split_fp, seed)
    ckpt_fp = (ckpt_dir or out_dir.parent / ".checkpoints") / f"{name}.pt"
    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [], "best_state": None}
    ckpt = _load_checkpoint(ckpt_fp, key)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        _logger.info("resuming %s from epoch %d (%s)", name, state["epoch"], ckpt_fp)

    started = time.perf_counter()
    while state["epoch"] < cfg.train.epochs and state["bad_epochs"] < cfg.train.patience:
        epoch = state["epoch"]
        _seed_all(seed * 1000 + epoch)
        dataset.rng = np.random.default_rng(seed * 1000 + epoch)
        sampler = create_sampler(dataset.target_labels(), cfg.train.sampler_power, seed * 1000 + epoch)
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, shuffle=sampler is None,
                            drop_last=len(dataset) > cfg.train.batch_size, num_workers=cfg.train.num_workers,
                            generator=torch.Generator().manual_seed(seed * 1000 + epoch),
                            pin_memory=device.type == "cuda")
        metrics = train_one_epoch(model, loader, criterion, optimizer, mixup, cfg, device, mean, std, frozen_bn,
                                  desc=f"{name} epoch {epoch + 1}/{cfg.train.epochs}")
        metrics.update(validate(model, val_imgs, split.labels["val"], cfg, device, mean, std))
        metrics.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
        scheduler.step()
        f1 = metrics["val_weighted_f1"]
        score = f1 if f1 == f1 else float(epoch)  # no val split: keep the last epoch
        if score > state["best_f1"]:
            state.update(best_f1=score, best_epoch=epoch + 1, bad_epochs=0,
                         best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        _logger.info("%s epoch %d: loss %.4f, %.1f img/s, val weighted F1 %.4f", name, epoch + 1,
                     metrics["train_loss"], metrics["train_img_s"], f1)
        _save_atomic({"run_key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "state": state}, ckpt_fp)

    out_dir.mkdir(parents=True, exist_ok=True)
    _save_atomic(state["best_state"] or model.state_dict(), out_dir / "model.pt")
    meta = {"backbone": cfg.model.backbone, "img_size": size, "class_names": list(split.class_names),
            "mean": list(mean), "std": list(std), "weights_source": weights_source, "seed": seed,
            "bootstrap": cfg.bag.bootstrap, "flips": dict(zip(split.class_names, flips)),
            "freeze": cfg.model.freeze, "epochs": cfg.train.epochs, "best_epoch": state["best_epoch"],
            "best_val_weighted_f1": _none_if_nan(state["history"][state["best_epoch"] - 1]["val_weighted_f1"]),
            "epochs_run": state["epoch"], "train_seconds": round(time.perf_counter() - started, 1),
            "device": device.type, "params_hash": cfg.params_hash()}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "history.json").write_text(json.dumps(state["history"], indent=2) + "\n", encoding="utf-8")
    ckpt_fp.unlink(missing_ok=True)
    return meta
