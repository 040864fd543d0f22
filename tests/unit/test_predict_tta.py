"""Test-time augmentation follows each class's flip policy; conflicting member policies fall back to no flip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.inference import BagPredictor, Member
from pipeline.commands.predict import _class_flips, predict_images

pytestmark = pytest.mark.unit
CLASSES = ["a", "b", "c"]


def _member(flips: dict, seed: int = 0) -> Member:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES)).eval()
    meta = {"img_size": 32, "class_names": CLASSES, "mean": [0.5] * 3, "std": [0.5] * 3, "flips": flips}
    return Member(model, meta)


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_tta_is_a_no_op_when_no_class_may_flip():
    bag = BagPredictor([_member({c: "none" for c in CLASSES})])
    ims = _images()
    np.testing.assert_allclose(predict_images(bag, ims, tta=True), predict_images(bag, ims, tta=False), atol=1e-6)


def test_tta_averages_only_the_views_a_class_allows():
    bag = BagPredictor([_member({"a": "both", "b": "h", "c": "none"})])
    ims = _images()
    base = predict_images(bag, ims)
    flipped = {view: predict_images(bag, [_apply(im, view) for im in ims]) for view in ("h", "v", "hv")}
    expect = np.stack([(base[:, 0] + flipped["h"][:, 0] + flipped["v"][:, 0] + flipped["hv"][:, 0]) / 4,
                       (base[:, 1] + flipped["h"][:, 1]) / 2, base[:, 2]], axis=1)
    expect /= expect.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(predict_images(bag, ims, tta=True), expect, atol=1e-5)
    assert not np.allclose(expect, base, atol=1e-4)  # the flips changed something: the check is not vacuous


def _apply(im: Image.Image, view: str) -> Image.Image:
    if "h" in view:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "v" in view:
        im = im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return im


def test_member_policies_combine_to_the_strictest():
    bag = BagPredictor([_member({"a": "both", "b": "h", "c": "both"}, 0),
                        _member({"a": "h", "b": "v", "c": "both"}, 1)])
    assert _class_flips(bag) == {"a": "h", "b": "none", "c": "both"}
