"""Test-time augmentation: the symmetries every class was trained with (model.tta), in one place for every path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.adapters.serving import BagModel, encode_image_file
from pipeline.commands.predict import predict_images
from pipeline.core.data import VARIANTS, apply_variant, tta_variants
from pipeline.core.inference import BagPredictor, Member

pytestmark = pytest.mark.unit
CLASSES = ["a", "b", "c"]


def _member(views: list[int] | None, seed: int = 0) -> Member:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES)).eval()
    meta = {"img_size": 32, "class_names": CLASSES, "mean": [0.5] * 3, "std": [0.5] * 3}
    if views is not None:
        meta["tta_variants"] = views
    return Member(model, meta)


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_tta_views_are_the_symmetries_every_class_allows():
    assert tta_variants(["d4", "d4"]) == list(range(8))
    assert tta_variants(["d4", "both"]) == [0, 1, 2, 3]
    assert tta_variants(["both", "h", "v"]) == [0]  # DACON's policy: only the photo itself is legal for all
    assert set(VARIANTS["both"]) <= set(VARIANTS["d4"])


def test_the_eight_variants_are_the_eight_distinct_symmetries():
    x = np.arange(9).reshape(3, 3, 1)
    seen = {apply_variant(x, v, "hwc").tobytes() for v in range(8)}
    assert len(seen) == 8
    t = torch.from_numpy(x).permute(2, 0, 1)
    for v in range(8):  # the tensor and the array paths agree
        np.testing.assert_array_equal(apply_variant(t, v).permute(1, 2, 0).numpy(), apply_variant(x, v, "hwc"))


def test_bag_averages_over_its_members_views_and_tta_off_gives_the_plain_image():
    bag = BagPredictor([_member([0, 1, 4])])
    ims = _images()
    arr = np.stack([np.asarray(im) for im in ims])
    plain = predict_images(bag, ims, tta=False)
    views = [
        predict_images(bag, [Image.fromarray(np.ascontiguousarray(apply_variant(a, v, "hwc"))) for a in arr], tta=False)
        for v in (0, 1, 4)
    ]
    np.testing.assert_allclose(predict_images(bag, ims, tta=True), np.mean(views, axis=0), atol=1e-5)
    assert not np.allclose(np.mean(views, axis=0), plain, atol=1e-4)  # the views changed something


def test_a_member_without_recorded_views_predicts_the_plain_image():
    bag = BagPredictor([_member(None)])
    ims = _images()
    np.testing.assert_allclose(predict_images(bag, ims, tta=True), predict_images(bag, ims, tta=False), atol=1e-6)


def test_pyfunc_param_tta_switches_it(tmp_path):
    model = BagModel()
    model.predictor = BagPredictor([_member(list(range(8)))])
    paths = []
    for i, im in enumerate(_images()):
        im.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    frame = pd.DataFrame({"image": [encode_image_file(p) for p in paths]})
    on = model.predict(None, frame)["confidence"].to_numpy()
    default = model.predict(None, frame, params=None)["confidence"].to_numpy()
    off = model.predict(None, frame, params={"tta": False})["confidence"].to_numpy()
    np.testing.assert_allclose(on, default)
    assert not np.allclose(on, off, atol=1e-5)


def test_the_pyfunc_holds_one_decoded_photo_at_a_time(monkeypatch):
    """Issue 32: a request of many large photos must not hold them all decoded (each may be up to MAX_PIXELS).
    When a row is decoded, no earlier row's decoded photo is still alive; the answer is the bag's own."""
    import base64
    import gc
    import io
    import weakref

    from pipeline.adapters.serving import predict_frame
    from pipeline.core import images as core_images

    bag = BagPredictor([_member([0, 1])])
    photos = _images(6)
    live: list[weakref.ref] = []
    alive_at_decode: list[int] = []
    real = core_images.decode_rgb

    def tracked(data, **kwargs):
        gc.collect()
        alive_at_decode.append(sum(ref() is not None for ref in live))
        image = real(data, **kwargs)
        live.append(weakref.ref(image))
        return image

    monkeypatch.setattr(core_images, "decode_rgb", tracked)

    def b64(image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")

    frame = pd.DataFrame({"image": [b64(p) for p in photos[:3]] + ["bm90IGFuIGltYWdl"] + [b64(p) for p in photos[3:]]})
    out = predict_frame(bag, frame)
    assert alive_at_decode == [0] * 7, alive_at_decode
    assert list(out["error"] != "") == [False, False, False, True, False, False, False]
    probs = bag.predict_proba(photos)
    expected = [bag.class_names[int(p.argmax())] for p in probs]
    assert [label for label in out["label"] if label] == expected
