"""Bag inference shared by the evaluate stage, the MLflow pyfunc and batch prediction.

A bag is a list of member folders (``model.pt`` + ``meta.json``); its prediction is the mean of
the members' softmax probabilities. Preprocessing (RGB normalisation, resize, mean/std) is the
training preprocessing, so serving sees what training saw.

Each member computes on the device it was loaded onto. On a GPU it computes as it trained: bf16 autocast
and channels_last when its ``meta.json`` says so (members from before those keys were recorded run fp32
NCHW). On a CPU it always runs fp32 NCHW, exactly as before GPUs were supported, so CPU scores do not move.

``predict_proba*`` return the raw mean probabilities (what evaluate scores and calibration fits on);
:meth:`BagPredictor.calibrated` applies the bag's temperature (``pipeline.core.calibration``) for the confidence
users see. Labels always come from the raw probabilities: the temperature never changes them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core import checkpoints
from pipeline.core.calibration import temperature_scale
from pipeline.core.data import normalize_batch
from pipeline.core.devices import autocast
from pipeline.core.images import resize_uint8, to_rgb

CPU = torch.device("cpu")


@dataclass
class Member:
    model: torch.nn.Module
    meta: dict
    device: torch.device = CPU

    @property
    def fast(self) -> bool:
        """bf16/channels_last as trained: on CUDA only (on a CPU bf16 is slower and would change the scores)."""
        return self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        return self.fast and bool(self.meta.get("channels_last", False))

    @property
    def amp(self) -> str:
        return self.meta.get("amp", "none") if self.fast else "none"

    def to(self, device: torch.device) -> "Member":
        """Move the model to ``device`` in the memory format it computes in there; returns ``self``."""
        self.device = torch.device(device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = self.model.to(self.device, memory_format=fmt)
        return self


def load_member(member_dir: Path, device: torch.device = CPU) -> Member:
    """The member in ``member_dir`` (weights checked against the SHA-256 in its meta.json), on ``device``."""
    import timm

    meta = json.loads((member_dir / "meta.json").read_text(encoding="utf-8"))
    model = timm.create_model(meta["backbone"], pretrained=False, num_classes=len(meta["class_names"]))
    fp = member_dir / "model.pt"
    state = checkpoints.load(fp, "model weights", meta.get("model_sha256"))
    checkpoints.load_state_into(model, state, f"model weights {fp}")
    return Member(model.eval(), meta).to(device)


class BagPredictor:
    """Average of member probabilities over one shared class list."""

    def __init__(self, members: list[Member]):
        if not members:
            raise ValueError("a bag needs at least one member")
        names = {tuple(m.meta["class_names"]) for m in members}
        if len(names) != 1:
            raise ValueError("bag members disagree on the class list")
        self.members = members
        self.class_names = list(names.pop())
        self.temperature = 1.0  # set from the registered model's calibration file; 1 = uncalibrated

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        """``probs`` (raw bag probabilities) after the bag's temperature: same argmax, calibrated confidence."""
        return probs if self.temperature == 1.0 else temperature_scale(probs, self.temperature)

    @classmethod
    def from_dirs(cls, member_dirs: list[Path], device: torch.device = CPU) -> "BagPredictor":
        """Load every member onto ``device`` (callers pick it: ``train.device`` or ``PIPELINE_DEVICE``)."""
        return cls([load_member(Path(d), device) for d in member_dirs])

    def to(self, device: torch.device) -> "BagPredictor":
        for m in self.members:
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @staticmethod
    def member_probs(m: Member, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32, on the member's device) for a uint8 NHWC batch."""
        x = batch.permute(0, 3, 1, 2).to(m.device, non_blocking=True)
        x = normalize_batch(x, tuple(m.meta["mean"]), tuple(m.meta["std"]), channels_last=m.channels_last)
        with autocast(m.device, m.amp):
            logits = m.model(x)
        return torch.softmax(logits.float(), dim=1)

    @torch.no_grad()
    def predict_proba_arrays(self, images: dict[int, np.ndarray], batch_size: int = 64) -> np.ndarray:
        """``images``: img_size -> N×H×W×3 uint8 (one array per input size the members need)."""
        probs = None
        for m in self.members:
            arr = images[m.meta["img_size"]]
            out = []
            for i in range(0, len(arr), batch_size):
                batch = torch.from_numpy(np.array(arr[i:i + batch_size]))
                out.append(self.member_probs(m, batch).cpu().numpy())
            p = np.concatenate(out) if out else np.zeros((0, len(self.class_names)), dtype=np.float32)
            probs = p if probs is None else probs + p
        return probs / len(self.members)

    def sizes(self) -> set[int]:
        return {m.meta["img_size"] for m in self.members}

    def predict_proba(self, images: list[Image.Image]) -> np.ndarray:
        arrays = {s: np.stack([resize_uint8(to_rgb(im), s) for im in images]) if images
                  else np.zeros((0, s, s, 3), np.uint8) for s in self.sizes()}
        return self.predict_proba_arrays(arrays)
