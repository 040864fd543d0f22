"""Distributed training helpers for ``torchrun`` (DDP): process-group setup and BatchNorm synchronisation.

Under ``torchrun --nproc_per_node=N -m pipeline train ...`` (WORLD_SIZE > 1) every rank joins one process group:
NCCL on GPUs (one per LOCAL_RANK), gloo on CPU; which of the two follows ``train.device``, not merely whether a
GPU exists. Single-process training uses :class:`Dist` with world 1, whose
methods are then no-ops. Kept apart from the training loop as timm keeps ``timm/utils/distributed.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in a torchrun job; the default (world 1) is plain single-process training."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: str = ""
    owned: bool = False  # this process started the process group, so it ends it
    device_type: str = "cpu"  # cpu | cuda: train.device as resolved by core.devices.resolve_device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` under DDP on GPUs, else ``cuda`` or ``cpu``."""
        if self.device_type != "cuda":
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


def init_distributed(device_type: str = "cpu") -> Dist:
    """Join the torchrun job when WORLD_SIZE > 1: NCCL on cuda:LOCAL_RANK, gloo on CPU.

    Args:
        device_type: ``cuda`` or ``cpu``, the resolved ``train.device`` (``core.devices.resolve_device``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device_type=device_type)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    owned = not dist.is_initialized()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if owned:  # rank 0 decodes the image cache and validates while the others wait: allow for it
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    ctx = Dist(dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend(), owned, device_type)
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
        out = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
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
