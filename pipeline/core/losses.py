"""Focal loss with label smoothing that also takes soft targets (CutMix mixes labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) on soft or hard targets, with label smoothing.

    ``loss = -sum_c t_c * (1 - p_c) ** gamma * log p_c``. With ``gamma = 0`` this is exactly
    cross-entropy with the same label smoothing (torch's definition: ``(1 - e) * onehot + e / K``).

    Args:
        gamma: focusing parameter; larger down-weights easy examples more.
        label_smoothing: applied to hard (integer) targets only; soft targets arrive smoothed
            already (timm's Mixup/CutMix smooths them).
    """

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        if target.dim() == 1:
            k = logits.shape[-1]
            target = F.one_hot(target, k).float() * (1 - self.label_smoothing) + self.label_smoothing / k
        weight = (1 - log_p.exp()).pow(self.gamma) if self.gamma else 1.0
        return -(target * weight * log_p).sum(dim=-1).mean()
