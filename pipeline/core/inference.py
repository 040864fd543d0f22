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
from pipeline.core.data import apply_variant, normalize_batch
from pipeline.core.devices import autocast
from pipeline.core.features import FrozenSplit, prefix_key, split_frozen
from pipeline.core.images import resize_uint8, to_rgb
from pipeline.core.models import apply_freeze

CPU = torch.device("cpu")


@dataclass
class Member:
    model: torch.nn.Module
    meta: dict
    device: torch.device = CPU
    frozen: FrozenSplit | None = None  # the frozen layers (model.freeze all_but_last:N) and the trained tail
    frozen_id: str = ""  # hash of the frozen layers' weights: members with the same id share their output

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

    def to(self, device: torch.device) -> Member:
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
    member = Member(model.eval(), meta)
    freeze = meta.get("freeze", "none")
    if freeze.startswith("all_but_last:"):
        apply_freeze(model, freeze)
        member.frozen = split_frozen(model, freeze)
        if member.frozen is not None:
            member.frozen_id = prefix_key(
                member.frozen.prefix, meta["backbone"], meta["img_size"], meta["mean"], meta["std"], []
            )
    return member.to(device)


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
        self.tta = True  # average over each member's tta_variants (model.tta); False: the plain image only

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        """``probs`` (raw bag probabilities) after the bag's temperature: same argmax, calibrated confidence."""
        return probs if self.temperature == 1.0 else temperature_scale(probs, self.temperature)

    @classmethod
    def from_dirs(cls, member_dirs: list[Path], device: torch.device = CPU) -> BagPredictor:
        """Load every member onto ``device`` (callers pick it: ``train.device`` or ``PIPELINE_DEVICE``)."""
        return cls([load_member(Path(d), device) for d in member_dirs])

    def to(self, device: torch.device) -> BagPredictor:
        for m in self.members:
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def views(self, m: Member) -> list[int]:
        """The symmetries member ``m`` averages over: its ``tta_variants`` (train stage), or none with TTA off."""
        return list(m.meta.get("tta_variants", [0])) if self.tta else [0]

    def member_probs(self, m: Member, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32, on the member's device) for a uint8 NHWC batch, averaged over views."""
        x0 = batch.permute(0, 3, 1, 2).to(m.device, non_blocking=True)
        total = None
        for v in self.views(m):
            x = normalize_batch(
                apply_variant(x0, v), tuple(m.meta["mean"]), tuple(m.meta["std"]), channels_last=m.channels_last
            )
            with autocast(m.device, m.amp):
                p = torch.softmax(m.model(x).float(), dim=1)
            total = p if total is None else total + p
        return total / len(self.views(m))

    def _groups(self) -> list[list[int]]:
        """Members that compute alike up to their tails (same frozen layers, size, views, device): one group."""
        groups: dict[object, list[int]] = {}
        for i, m in enumerate(self.members):
            key = (
                (m.frozen_id, m.meta["img_size"], tuple(self.views(m)), str(m.device), m.channels_last, m.amp)
                if m.frozen_id
                else i
            )
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _group_probs(self, group: list[Member], batch: torch.Tensor) -> list[torch.Tensor]:
        """Each member's probabilities for a uint8 NHWC batch; the frozen layers run once for the whole group."""
        if len(group) == 1:
            return [self.member_probs(group[0], batch)]
        lead = group[0]
        x0 = batch.permute(0, 3, 1, 2).to(lead.device, non_blocking=True)
        totals: list = [None] * len(group)
        for v in self.views(lead):
            x = normalize_batch(
                apply_variant(x0, v),
                tuple(lead.meta["mean"]),
                tuple(lead.meta["std"]),
                channels_last=lead.channels_last,
            )
            with autocast(lead.device, lead.amp):
                features = lead.frozen.prefix(x)
                for k, m in enumerate(group):
                    p = torch.softmax(m.frozen.tail(features).float(), dim=1)
                    totals[k] = p if totals[k] is None else totals[k] + p
        return [t / len(self.views(lead)) for t in totals]

    @torch.no_grad()
    def member_proba_arrays(
        self,
        images: dict[int, np.ndarray],
        batch_size: int = 64,
        shas: list[str] | None = None,
        feature_dir: Path | None = None,
    ) -> list[np.ndarray]:
        """Each member's probabilities (N × classes) for ``images`` (img_size -> N×H×W×3 uint8).

        Members whose frozen layers are the same weights (a bag fine-tuned from one pretrained backbone with
        ``model.freeze: all_but_last:N``) run those layers once per batch and view and only their own tails.
        With the images' ``shas`` and the train stage's ``feature_dir``, those layers' output comes from the
        frozen-layer cache where training left it (float16 maps: probabilities within ~1e-3 of the direct path,
        so only stages that need no bit-parity with serving pass them, e.g. label_issues).
        """
        out: list = [None] * len(self.members)
        for group in self._groups():
            members = [self.members[i] for i in group]
            arr = images[members[0].meta["img_size"]]
            lead = members[0]
            if lead.frozen is not None and shas is not None and feature_dir is not None:
                from pipeline.core.features import build_features, tail_probs

                meta, views = lead.meta, self.views(lead)
                key = prefix_key(
                    lead.frozen.prefix, meta["backbone"], meta["img_size"], meta["mean"], meta["std"], views
                )
                feats = build_features(
                    lead.frozen.prefix,
                    arr,
                    shas,
                    views,
                    key,
                    feature_dir,
                    tuple(meta["mean"]),
                    tuple(meta["std"]),
                    lead.channels_last,
                )
                for idx, m in zip(group, members):
                    out[idx] = tail_probs(
                        m.frozen.tail, feats, views, list(range(len(views))), m.device, m.channels_last
                    ).astype(np.float32)
                continue
            parts: list[list[np.ndarray]] = [[] for _ in group]
            for i in range(0, len(arr), batch_size):
                batch = torch.from_numpy(np.array(arr[i : i + batch_size]))
                for k, p in enumerate(self._group_probs(members, batch)):
                    parts[k].append(p.cpu().numpy())
            for k, idx in enumerate(group):
                out[idx] = (
                    np.concatenate(parts[k]) if parts[k] else np.zeros((0, len(self.class_names)), dtype=np.float32)
                )
        return out

    def predict_proba_arrays(self, images: dict[int, np.ndarray], batch_size: int = 64) -> np.ndarray:
        """The bag's probabilities: the mean of :meth:`member_proba_arrays`."""
        return np.mean(self.member_proba_arrays(images, batch_size), axis=0)

    def sizes(self) -> set[int]:
        return {m.meta["img_size"] for m in self.members}

    def input_arrays(self, image: Image.Image) -> dict[int, np.ndarray]:
        """One photo as the members take it: RGB, resized to each member size (HWC uint8)."""
        rgb = to_rgb(image)
        return {s: resize_uint8(rgb, s) for s in self.sizes()}

    def stack_inputs(self, inputs: list[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
        """:meth:`input_arrays` of several photos as the batch arrays :meth:`predict_proba_arrays` takes."""
        return {
            s: np.stack([x[s] for x in inputs]) if inputs else np.zeros((0, s, s, 3), np.uint8) for s in self.sizes()
        }

    def predict_proba(self, images: list[Image.Image]) -> np.ndarray:
        return self.predict_proba_arrays(self.stack_inputs([self.input_arrays(im) for im in images]))
