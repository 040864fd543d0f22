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

import hashlib
import json
import logging
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import f1_score
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline import checkpoints
from pipeline.config import Config
from pipeline.data import (CachedImageDataset, bootstrap_indices, build_cache, create_sampler, flips_per_label,
                           load_split, normalize_batch, train_loader)
from pipeline.errors import CheckpointError, ConfigError, PipelineError
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
        with _autocast(cfg, device):
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


def _save_atomic(obj, path: Path) -> str:
    """Atomic write (temporary file, fsync, rename); returns the file's SHA-256."""
    return checkpoints.save(obj, path)


def _load_checkpoint(path: Path, key: str) -> dict | None:
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


# --- Multi-process training: torchrun -> DistributedDataParallel -------------------------------------------


@dataclass
class _Dist:
    """This process's place in a torchrun job; the default (world 1) is plain single-process training."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: str = ""
    owned: bool = False  # this process started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{self.local_rank}" if self.world > 1 else "cuda")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def broadcast(self, obj):
        """Rank 0's ``obj``, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and not self.main:
            logging.getLogger("pipeline").setLevel(logging.NOTSET)
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def _init_distributed() -> _Dist:
    """Join the torchrun job when WORLD_SIZE > 1: NCCL on cuda:LOCAL_RANK, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    owned = not dist.is_initialized()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if owned:  # rank 0 decodes the image cache and validates while the others wait: allow for it
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    ctx = _Dist(dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend(), owned)
    if not ctx.main:  # one set of log lines (rank 0's); warnings and errors still show from every rank
        logging.getLogger("pipeline").setLevel(logging.WARNING)
    return ctx


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too (what torch's SyncBatchNorm does)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, for DDP on CPU (gloo).

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors. Same parameters, buffers and state-dict keys as the
    layer it replaces; ``drop``/``act`` carry a timm ``BatchNormAct2d``'s fused dropout and activation.
    Eval mode (validation, frozen layers) and single-process use are plain BatchNorm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.drop = torch.nn.Identity()
        self.act = torch.nn.Identity()

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = self._synced(x)
        else:
            x = super().forward(x)
        return self.act(self.drop(x))

    def _synced(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, c) + (1,) * (x.dim() - 2)
        xf = x.float()
        sums = _all_reduce_sum(torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / c])]))
        n = sums[c]
        if n.item() <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {int(n.item())}")
        mean = sums[:c] / n
        centred = xf - mean.view(shape)  # two passes: no cancellation in E[x^2] - E[x]^2
        var = _all_reduce_sum((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (n / (n - 1)), alpha=f)
        return y.to(x.dtype)


def _convert_gloo_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Like timm's ``convert_sync_batchnorm``, with :class:`GlooSyncBatchNorm` (shares params and buffers)."""
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for child_name, child in module.named_children():
        out.add_module(child_name, _convert_gloo_sync_batchnorm(child))
    return out


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm layer of ``model`` synchronised across DDP ranks (GPU: SyncBatchNorm; CPU: gloo).

    timm's converter, not ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: torch's would turn timm's
    ``BatchNormAct2d`` (EfficientNets) into a plain SyncBatchNorm and silently drop its activation.
    """
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return _convert_gloo_sync_batchnorm(model)


def run_train(cfg: Config, split_fp: Path, raw_dir: Path, member: int, out_dir: Path,
              cache_dir: Path | None = None, ckpt_dir: Path | None = None, name: str = "") -> dict:
    """Train bag member ``member`` (its seed); write model.pt, meta.json and history.json to ``out_dir``.

    ``name`` names the checkpoint and log lines (default ``member_<member>``; the backbone stage passes
    ``backbone_<timm name>``). Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 writes the
    outputs and returns the meta, the other ranks return ``{}``.
    """
    ddp = _init_distributed()
    try:
        return _run_train(ddp, cfg, split_fp, raw_dir, member, out_dir, cache_dir, ckpt_dir, name)
    finally:
        ddp.close()


def _run_train(ddp: _Dist, cfg: Config, split_fp: Path, raw_dir: Path, member: int, out_dir: Path,
               cache_dir: Path | None, ckpt_dir: Path | None, name: str) -> dict:
    name = name or f"member_{member}"
    seed = member
    if cfg.train.batch_size % ddp.world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be divisible by the number of training "
                          f"processes (WORLD_SIZE {ddp.world}): it is the global batch, split evenly over them")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = ddp.device()
    if ddp.world > 1:
        per_rank = cfg.train.batch_size // ddp.world
        _logger.info("%s: DDP world_size %d (%s), %d images per rank per step, global batch %d", name,
                     ddp.world, ddp.backend, per_rank, cfg.train.batch_size)
        if cfg.train.cutmix_prob > 0 and per_rank % 2:
            _logger.warning("CutMix is skipped on odd batches: %d images per rank never get it", per_rank)
    _seed_all(seed)
    split = load_split(split_fp)
    model, weights_source = create_model(cfg.model.backbone, len(split.class_names), cfg.model.weights,
                                         cfg.model.freeze)
    if ddp.world > 1:  # before collecting frozen_bn: conversion replaces the BatchNorm modules
        model = sync_batchnorm(model, device)
    frozen_bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and not any(p.requires_grad for p in m.parameters())]
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
    if not ddp.main:
        ddp.barrier()  # rank 0 reads (or sets aside) the checkpoint first; then every rank loads the same file
    ckpt = _load_checkpoint(ckpt_fp, key)
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
    net = model if ddp.world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)

    started = time.perf_counter()
    while state["epoch"] < cfg.train.epochs and state["bad_epochs"] < cfg.train.patience:
        epoch = state["epoch"]
        _seed_all(seed * 1000 + epoch)
        # flips: own draws per rank under DDP (the sample order and CutMix draws stay common to all ranks)
        dataset.rng = np.random.default_rng(seed * 1000 + epoch if ddp.world == 1
                                            else [seed * 1000 + epoch, ddp.rank])
        sampler = create_sampler(dataset.target_labels(), cfg.train.sampler_power, seed * 1000 + epoch)
        loader = train_loader(dataset, cfg.train.batch_size, sampler, seed * 1000 + epoch, cfg.train.num_workers,
                              device.type == "cuda", ddp.rank, ddp.world)
        metrics = train_one_epoch(net, loader, criterion, optimizer, mixup, cfg, device, mean, std, frozen_bn,
                                  desc=f"{name} epoch {epoch + 1}/{cfg.train.epochs}")
        if ddp.main:
            metrics.update(validate(model, val_imgs, split.labels["val"], cfg, device, mean, std))
        metrics = ddp.broadcast(metrics)  # rank 0's: every rank takes the same early-stopping decisions
        metrics.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
        scheduler.step()
        f1 = metrics["val_weighted_f1"]
        score = f1 if f1 == f1 else float(epoch)  # no val split: keep the last epoch
        if score > state["best_f1"]:
            state.update(best_f1=score, best_epoch=epoch + 1, bad_epochs=0,
                         best_state={k: v.detach().clone() for k, v in model.state_dict().items()}
                         if ddp.main else None)
        else:
            state["bad_epochs"] += 1
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        _logger.info("%s epoch %d: loss %.4f, %.1f img/s, val weighted F1 %.4f", name, epoch + 1,
                     metrics["train_loss"], metrics["train_img_s"], f1)
        if ddp.main:
            _save_atomic({"run_key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "state": state}, ckpt_fp)
        ddp.barrier()

    if not ddp.main:
        ddp.barrier()  # rank 0 writes model.pt, meta.json and history.json
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    model_sha256 = _save_atomic(state["best_state"] or model.state_dict(), out_dir / "model.pt")
    meta = {"backbone": cfg.model.backbone, "img_size": size, "class_names": list(split.class_names),
            "mean": list(mean), "std": list(std), "weights_source": weights_source, "seed": seed,
            "bootstrap": cfg.bag.bootstrap, "flips": dict(zip(split.class_names, flips)),
            "freeze": cfg.model.freeze, "epochs": cfg.train.epochs, "best_epoch": state["best_epoch"],
            "best_val_weighted_f1": _none_if_nan(state["history"][state["best_epoch"] - 1]["val_weighted_f1"]),
            "epochs_run": state["epoch"], "train_seconds": round(time.perf_counter() - started, 1),
            "device": device.type, "params_hash": cfg.params_hash(), "model_sha256": model_sha256}
    meta["world_size"] = ddp.world
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "history.json").write_text(json.dumps(state["history"], indent=2) + "\n", encoding="utf-8")
    ckpt_fp.unlink(missing_ok=True)
    ddp.barrier()
    return meta
