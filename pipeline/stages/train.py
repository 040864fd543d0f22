"""Stage ``train``: fine-tune one bag member (a timm backbone) on the train split.

    python -m pipeline train --params params.yaml --split data/split.csv --raw-dir data/raw \
        --member 0 --out-dir models/member_0

Imports no Airflow, MLflow or DVC: this runs on a bare GPU box with torch and timm. Recipe: focal
loss with label smoothing, CutMix (timm's Mixup), weighted random sampling, AdamW + ExponentialLR,
early stopping and best-checkpoint selection on validation weighted F1. Each epoch ends with an
atomic checkpoint; a killed run restarted with the same inputs continues from it. Every epoch
re-seeds from (member seed, epoch), so a resumed run follows the same path as an uninterrupted one.

Under ``torchrun --nproc_per_node=N -m pipeline train ...`` (WORLD_SIZE > 1) the same stage trains with
DistributedDataParallel: NCCL on GPUs (one per LOCAL_RANK), gloo on CPU. ``train.batch_size`` stays the global
batch; each rank takes its slice of every global batch of the single-process sample order, BatchNorm layers
are synchronised across ranks, the logged train loss is the global mean, and rank 0 alone validates and
writes checkpoints and outputs (same format as a single-process run, plus ``world_size`` in meta.json).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.core import checkpoints
from pipeline.core.config import Config
from pipeline.core.data import (
    VARIANTS,
    CachedImageDataset,
    build_cache,
    create_sampler,
    flips_per_label,
    load_split,
    member_indices,
    train_loader,
    tta_variants,
)
from pipeline.core.devices import resolve_device
from pipeline.core.distributed import Dist, init_distributed, sync_batchnorm
from pipeline.core.engine import load_resume_checkpoint, none_if_nan, run_key, seed_all, train_one_epoch, validate
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.features import FeatureDataset, build_features, prefix_key, split_frozen
from pipeline.core.io import write_text_atomic
from pipeline.core.losses import FocalLoss
from pipeline.core.models import create_model

_logger = logging.getLogger(__name__)


def _s3_bytes(uri: str) -> bytes:
    """Reads ``model.weights: s3://...`` (boto3 is imported only when weights come from S3)."""
    from pipeline.adapters import storage

    return storage.get_bytes(uri)


def run_train(
    cfg: Config,
    split_fp: Path,
    raw_dir: Path,
    member: int,
    out_dir: Path,
    cache_dir: Path | None = None,
    ckpt_dir: Path | None = None,
    name: str = "",
) -> dict:
    """Train bag member ``member`` (its seed); write model.pt, meta.json and history.json to ``out_dir``.

    ``name`` names the checkpoint and log lines (default ``member_<member>``; the backbone stage passes
    ``backbone_<timm name>``). Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 writes the
    outputs and returns the meta, the other ranks return ``{}``.
    """
    device = resolve_device(cfg.train.device, "train.device")  # before joining a group: a bad value ends here
    ddp = init_distributed(device.type)
    try:
        return _run_train(ddp, cfg, split_fp, raw_dir, member, out_dir, cache_dir, ckpt_dir, name)
    finally:
        ddp.close()


def _run_train(
    ddp: Dist,
    cfg: Config,
    split_fp: Path,
    raw_dir: Path,
    member: int,
    out_dir: Path,
    cache_dir: Path | None,
    ckpt_dir: Path | None,
    name: str,
) -> dict:
    name = name or f"member_{member}"
    seed = member
    if cfg.train.batch_size % ddp.world:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} must be divisible by the number of training "
            f"processes (WORLD_SIZE {ddp.world}): it is the global batch, split evenly over them"
        )
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = ddp.device()
    _logger.info(
        "%s: training on %s (train.device %s, amp %s, channels_last %s)",
        name,
        device,
        cfg.train.device,
        cfg.train.amp,
        cfg.train.channels_last,
    )
    if ddp.world > 1:
        per_rank = cfg.train.batch_size // ddp.world
        _logger.info(
            "%s: DDP world_size %d (%s), %d images per rank per step, global batch %d",
            name,
            ddp.world,
            ddp.backend,
            per_rank,
            cfg.train.batch_size,
        )
        if cfg.train.cutmix_prob > 0 and per_rank % 2:
            _logger.warning("CutMix is skipped on odd batches: %d images per rank never get it", per_rank)
    seed_all(seed)
    split = load_split(split_fp)
    model, weights_source = create_model(
        cfg.model.backbone, len(split.class_names), cfg.model.weights, cfg.model.freeze, fetch_bytes=_s3_bytes
    )
    if ddp.world > 1:  # before collecting frozen_bn: conversion replaces the BatchNorm modules
        model = sync_batchnorm(model, device)
    frozen_bn = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())
    ]
    import timm.data

    data_cfg = timm.data.resolve_model_data_config(model)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = cfg.model.img_size
    if not ddp.main:
        ddp.barrier()  # rank 0 decodes the images into the cache first; the others then read it
    train_imgs = build_cache(raw_dir, split.paths["train"], split.sha256["train"], size, cache_dir)
    val_imgs = build_cache(raw_dir, split.paths["val"], split.sha256["val"], size, cache_dir) if ddp.main else None
    if ddp.main:
        ddp.barrier()
    indices = member_indices(
        split.labels["train"], split.groups["train"], cfg.bag.seeds, seed, cfg.bag.bootstrap, cfg.bag.folds
    )
    flips = flips_per_label(split.class_names, cfg.train.flip_policy, cfg.train.flip_default)
    views = tta_variants(flips) if cfg.model.tta else [0]  # what evaluate and serving average over
    val_views = views if cfg.train.val_tta else [0]  # what picks the best epoch
    frozen = split_frozen(model, cfg.model.freeze) if cfg.train.cache_frozen else None
    if frozen is not None:
        # train the tail on the frozen layers' cached output (core/features.py); the model saved is still whole
        drawn = sorted({v for f in flips for v in VARIANTS[f]} | set(views))
        feat_dir = cache_dir.parent / "features" if cache_dir is not None else None
        if not ddp.main:
            ddp.barrier()
        train_feats = build_features(
            frozen.prefix,
            train_imgs,
            split.sha256["train"],
            drawn,
            prefix_key(frozen.prefix, cfg.model.backbone, size, mean, std, drawn),
            feat_dir,
            mean,
            std,
            cfg.train.channels_last,
        )
        val_feats = (
            build_features(
                frozen.prefix,
                val_imgs,
                split.sha256["val"],
                val_views,
                prefix_key(frozen.prefix, cfg.model.backbone, size, mean, std, val_views),
                feat_dir,
                mean,
                std,
                cfg.train.channels_last,
            )
            if ddp.main
            else None
        )
        if ddp.main:
            ddp.barrier()
        dataset = FeatureDataset(train_feats, drawn, split.labels["train"], indices, [VARIANTS[f] for f in flips], seed)
        val_inputs, trained = (val_feats, val_views), frozen.tail
    else:
        dataset = CachedImageDataset(train_imgs, split.labels["train"], indices, flips, seed)
        val_inputs, trained = (val_imgs, val_views), model
    criterion = FocalLoss(cfg.train.focal_gamma, cfg.train.label_smoothing)
    mixup = None
    if cfg.train.cutmix_prob > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=0.0,
            cutmix_alpha=cfg.train.cutmix_alpha,
            prob=cfg.train.cutmix_prob,
            label_smoothing=cfg.train.label_smoothing,
            num_classes=len(split.class_names),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.train.lr_gamma)

    key = run_key(cfg, split_fp, seed)
    ckpt_fp = (ckpt_dir or out_dir.parent / ".checkpoints") / f"{name}.pt"
    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [], "best_state": None}
    if not ddp.main:
        ddp.barrier()  # rank 0 reads (or sets aside) the checkpoint first; then every rank loads the same file
    ckpt = load_resume_checkpoint(ckpt_fp, key)
    if ddp.main:
        ddp.barrier()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        _logger.info("resuming %s from epoch %d (%s)", name, state["epoch"], ckpt_fp)
    if ddp.broadcast(state["epoch"]) != state["epoch"]:
        raise PipelineError(f"rank {ddp.rank} read {ckpt_fp} as epoch {state['epoch']}, rank 0 as another epoch")
    # ``model`` stays the bare module: validation, state dicts and files never see the DDP wrapper.
    net = (
        trained
        if ddp.world == 1
        else DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
    )

    started = time.perf_counter()
    while state["epoch"] < cfg.train.epochs and state["bad_epochs"] < cfg.train.patience:
        epoch = state["epoch"]
        seed_all(seed * 1000 + epoch)
        # flips: own draws per rank under DDP (the sample order and CutMix draws stay common to all ranks);
        # loader workers reseed their copies from the loader's per-epoch seed and the rank (data.seed_worker)
        dataset.reseed(seed * 1000 + epoch if ddp.world == 1 else [seed * 1000 + epoch, ddp.rank])
        sampler = create_sampler(dataset.target_labels(), cfg.train.sampler_power, seed * 1000 + epoch)
        loader = train_loader(
            dataset,
            cfg.train.batch_size,
            sampler,
            seed * 1000 + epoch,
            cfg.train.num_workers,
            device.type == "cuda",
            ddp.rank,
            ddp.world,
        )
        metrics = train_one_epoch(
            net,
            loader,
            criterion,
            optimizer,
            mixup,
            cfg,
            device,
            mean,
            std,
            frozen_bn,
            desc=f"{name} epoch {epoch + 1}/{cfg.train.epochs}",
        )
        if ddp.main:
            metrics.update(
                validate(trained, val_inputs, split.labels["val"], cfg, device, mean, std, cached=frozen is not None)
            )
        metrics = ddp.broadcast(metrics)  # rank 0's: every rank takes the same early-stopping decisions
        metrics.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
        scheduler.step()
        f1 = metrics["val_weighted_f1"]
        score = f1 if f1 == f1 else float(epoch)  # no val split: keep the last epoch
        if score > state["best_f1"]:
            state.update(
                best_f1=score,
                best_epoch=epoch + 1,
                bad_epochs=0,
                best_state={k: v.detach().clone() for k, v in model.state_dict().items()} if ddp.main else None,
            )
        else:
            state["bad_epochs"] += 1
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        _logger.info(
            "%s epoch %d: loss %.4f, %.1f img/s, val weighted F1 %.4f",
            name,
            epoch + 1,
            metrics["train_loss"],
            metrics["train_img_s"],
            f1,
        )
        if ddp.main:
            checkpoints.save(
                {
                    "run_key": key,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": state,
                },
                ckpt_fp,
            )
        ddp.barrier()

    if not ddp.main:
        ddp.barrier()  # rank 0 writes model.pt, meta.json and history.json
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    model_sha256 = checkpoints.save(state["best_state"] or model.state_dict(), out_dir / "model.pt")
    meta = {
        "backbone": cfg.model.backbone,
        "img_size": size,
        "class_names": list(split.class_names),
        "mean": list(mean),
        "std": list(std),
        "weights_source": weights_source,
        "seed": seed,
        "bootstrap": cfg.bag.bootstrap,
        "folds": cfg.bag.folds,
        "train_images": len(indices),
        # with bag.folds: the fold of len(bag.seeds) this member left out (data.fold_of_groups deals them
        # from split.csv alone, so a reproduce of this version deals the same folds)
        "held_out_fold": (
            list(cfg.bag.seeds).index(seed)
            if cfg.bag.folds and len(cfg.bag.seeds) > 1 and seed in cfg.bag.seeds
            else None
        ),
        "flips": dict(zip(split.class_names, flips)),
        "tta_variants": views,
        "val_views": val_views,
        "cache_frozen": frozen is not None,
        "malloc": os.environ.get("GLIBC_TUNABLES", ""),
        "freeze": cfg.model.freeze,
        "epochs": cfg.train.epochs,
        "best_epoch": state["best_epoch"],
        "best_val_weighted_f1": none_if_nan(state["history"][state["best_epoch"] - 1]["val_weighted_f1"]),
        "epochs_run": state["epoch"],
        "train_seconds": round(time.perf_counter() - started, 1),
        "device": device.type,
        "params_hash": cfg.params_hash(),
        "model_sha256": model_sha256,
        # how the member computed in training; inference on a GPU computes the same way (core.inference)
        "amp": cfg.train.amp,
        "channels_last": cfg.train.channels_last,
    }
    meta["world_size"] = ddp.world
    write_text_atomic(out_dir / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out_dir / "history.json", json.dumps(state["history"], indent=2) + "\n")
    ckpt_fp.unlink(missing_ok=True)
    ddp.barrier()
    return meta
