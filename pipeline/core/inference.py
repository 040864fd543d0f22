"""Bag inference shared by the evaluate stage, the MLflow pyfunc and batch prediction.

A bag is a list of member folders (``model.pt`` + ``meta.json``); its prediction is the mean of
the members' softmax probabilities. Preprocessing (RGB normalisation, resize, mean/std) is the
training preprocessing, so serving sees what training saw.

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
from pipeline.core.images import resize_uint8, to_rgb


@dataclass
class Member:
    model: torch.nn.Module
    meta: dict


def load_member(member_dir: Path) -> Member:
    import timm

    meta = json.loads((member_dir / "meta.json").read_text(encoding="utf-8"))
    model = timm.create_model(meta["backbone"], pretrained=False, num_classes=len(meta["class_names"]))
    fp = member_dir / "model.pt"
    state = checkpoints.load(fp, "model weights", meta.get("model_sha256"))
    checkpoints.load_state_into(model, state, f"model weights {fp}")
    return Member(model.eval(), meta)


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
    def from_dirs(cls, member_dirs: list[Path]) -> "BagPredictor":
        return cls([load_member(Path(d)) for d in member_dirs])

    @torch.no_grad()
    def predict_proba_arrays(self, images: dict[int, np.ndarray], batch_size: int = 64) -> np.ndarray:
        """``images``: img_size -> N×H×W×3 uint8 (one array per input size the members need)."""
        probs = None
        for m in self.members:
            arr = images[m.meta["img_size"]]
            out = []
            for i in range(0, len(arr), batch_size):
                x = torch.from_numpy(np.array(arr[i:i + batch_size])).permute(0, 3, 1, 2)
                x = normalize_batch(x, tuple(m.meta["mean"]), tuple(m.meta["std"]), channels_last=False)
                out.append(torch.softmax(m.model(x).float(), dim=1).numpy())
            p = np.concatenate(out) if out else np.zeros((0, len(self.class_names)), dtype=np.float32)
            probs = p if probs is None else probs + p
        return probs / len(self.members)

    def sizes(self) -> set[int]:
        return {m.meta["img_size"] for m in self.members}

    def predict_proba(self, images: list[Image.Image]) -> np.ndarray:
        arrays = {s: np.stack([resize_uint8(to_rgb(im), s) for im in images]) if images
                  else np.zeros((0, s, s, 3), np.uint8) for s in self.sizes()}
        return self.predict_proba_arrays(arrays)
