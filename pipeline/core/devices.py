"""Which device the pipeline computes on, and the precision it uses there.

``train.device`` in params (train, evaluate and the gate's re-score) and ``PIPELINE_DEVICE`` in the environment
(the pyfunc and batch prediction, which have no params) take ``auto`` (CUDA when torch sees a GPU, else the CPU),
``cpu`` or ``cuda``. Asking for ``cuda`` where torch sees none is an error naming the key, never a silent fallback:
a run meant for a GPU that quietly trains on a CPU would take days.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipeline.core import settings
from pipeline.core.config import DEVICE_CHOICES
from pipeline.core.errors import ConfigError

DEVICE_ENV = "PIPELINE_DEVICE"


def resolve_device(choice: str = "auto", key: str = "train.device") -> torch.device:
    """The ``torch.device`` for ``choice`` (auto | cpu | cuda); ``key`` names where the choice came from.

    Checked here, when a stage starts on the machine that computes, not when params are loaded: the Airflow
    scheduler that validates params usually has no GPU while the worker that trains does.
    """
    if choice not in DEVICE_CHOICES:
        raise ConfigError(f"{key} must be one of {', '.join(DEVICE_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{key} is cuda, but torch {torch.__version__} sees no CUDA device here "
            f"(built for CUDA {torch.version.cuda or 'none'}); set {key} to auto or cpu"
        )
    return torch.device(choice)


def env_device() -> torch.device:
    """The device from ``PIPELINE_DEVICE`` (default ``auto``), for code that reads no params (serving, predict)."""
    return resolve_device(settings.device(), DEVICE_ENV)


def autocast(device: torch.device, amp: str):
    """bf16 autocast on ``device`` when ``amp`` is ``bf16`` (autocast follows the device type, as nanoGPT does)."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
