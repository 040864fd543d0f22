"""The recipe's quality levers: frozen-layer cache, K-fold bag, gate floor on test images, malloc in stage processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.data import fold_of_groups, member_indices
from pipeline.core.features import build_features, prefix_key, split_frozen
from pipeline.core.gate import gate
from pipeline.core.models import apply_freeze
from pipeline.core.oob import in_bag_matrix

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _model(freeze: str = "all_but_last:2"):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    apply_freeze(model, freeze)
    return model.eval()


def test_prefix_then_tail_is_the_whole_model():
    model = _model()
    split = split_frozen(model, "all_but_last:2")
    assert split is not None
    assert not any(p.requires_grad for p in split.prefix.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(split.tail(split.prefix(x)), model(x), rtol=1e-5, atol=1e-5)
    assert split_frozen(model, "none") is None and split_frozen(model, "backbone") is None


def test_training_the_tail_trains_the_saved_model():
    model = _model()
    split = split_frozen(model, "all_but_last:2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():
        shape = split.prefix(torch.zeros(1, 3, 32, 32)).shape[1:]
    split.tail.train()
    for bn in apply_freeze(model, "all_but_last:2"):  # as train_one_epoch does: frozen BatchNorm stays in eval
        bn.eval()
    loss = split.tail(torch.randn(4, *shape)).sum()
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("classifier") for k in changed)
    assert not any(k.startswith(("conv_stem", "bn1", "blocks.0.")) for k in changed)


def test_feature_cache_is_keyed_by_content_and_reused(tmp_path):
    model = _model()
    split = split_frozen(model, "all_but_last:2")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    shas = ["a" * 64, "b" * 64, "c" * 64]
    key = prefix_key(split.prefix, "test_efficientnet", 32, (0.5,) * 3, (0.5,) * 3, [0, 1])
    first = build_features(split.prefix, images, shas, [0, 1], key, tmp_path, (0.5,) * 3, (0.5,) * 3)
    assert first.shape[:2] == (3, 2) and first.dtype == np.float16
    assert len(list((tmp_path / key).glob("*.npy"))) == 3
    # a cached file is read, not recomputed: plant a marker in one and see it come back
    planted = np.load(tmp_path / key / f"{shas[1]}.npy")
    planted[:] = 7
    np.save(tmp_path / key / f"{shas[1]}.npy", planted)
    again = build_features(split.prefix, images, shas, [0, 1], key, tmp_path, (0.5,) * 3, (0.5,) * 3)
    assert np.all(again[1] == 7) and np.array_equal(again[0], first[0])
    # the flipped view is the prefix of the flipped image
    with torch.no_grad():
        x = (torch.from_numpy(images[:1]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        np.testing.assert_allclose(first[0, 1], split.prefix(x.flip(-1))[0].numpy(), rtol=2e-3, atol=2e-3)
    # other weights, other key: never a stale map
    with torch.no_grad():
        next(split.prefix.parameters()).add_(1.0)
    assert prefix_key(split.prefix, "test_efficientnet", 32, (0.5,) * 3, (0.5,) * 3, [0, 1]) != key
    assert prefix_key(split.prefix, "test_efficientnet", 32, (0.5,) * 3, (0.5,) * 3, [0]) != key


def test_folds_hold_out_every_train_image_exactly_once_and_keep_groups_whole():
    labels = [0] * 30 + [1] * 12 + [2] * 4
    groups = [f"g{i // 2}" for i in range(len(labels))]  # pairs of near-duplicates
    seeds = (0, 1, 2)
    seen = in_bag_matrix(labels, seeds, bootstrap=False, groups=groups, folds=True)
    assert (seen.sum(axis=1) == 2).all()  # 3 members, each image out of exactly one
    folds = fold_of_groups(labels, groups, 3)
    for g in set(groups):
        assert len({f for f, gg in zip(folds, groups) if gg == g}) == 1
    per_fold = Counter((y, f) for y, f in zip(labels, folds))
    assert all(abs(per_fold[(0, f)] - 10) <= 2 for f in range(3))  # stratified
    for m, s in enumerate(seeds):
        assert member_indices(labels, groups, seeds, s, False, True) == [i for i, f in enumerate(folds) if f != m]
    # one member: nothing to hold out
    assert member_indices(labels, groups, (5,), 5, False, True) == list(range(len(labels)))


def test_gate_refuses_below_min_test_images_and_the_champion_stays():
    truth = ["a", "b"] * 10
    d = gate(truth, list(truth), None, floor=0.0, min_delta=0.0, confidence=0.9, min_test_images=100)
    assert not d.promote and "20 test images < registry.min_test_images 100" in d.reason
    assert gate(truth, list(truth), None, 0.0, 0.0, 0.9, min_test_images=20).promote


def test_stage_processes_start_with_the_malloc_thresholds(tmp_path):
    from pipeline.__main__ import MALLOC_TUNABLES

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PIPELINE_MALLOC")}
    env.update(PIPELINE_LOG_LEVEL="DEBUG", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "summary", "--dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"GLIBC_TUNABLES={MALLOC_TUNABLES}" in proc.stderr, proc.stderr[-2000:]
    env["PIPELINE_MALLOC"] = "default"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "summary", "--dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "GLIBC_TUNABLES=\n" in proc.stderr or "GLIBC_TUNABLES=" + "\n" in proc.stderr, proc.stderr[-2000:]


def test_train_stage_with_cached_frozen_layers_matches_its_record(tmp_path):
    """The cached path trains, saves a whole model evaluate can load, and records what it did."""
    from pipeline.core.config import config_from_dict
    from pipeline.core.data import load_split
    from pipeline.core.inference import BagPredictor
    from pipeline.stages.train import run_train
    from tests.integration.helpers import write_tiny_split

    write_tiny_split(tmp_path, per_class=8)
    params = {
        "data": {"landing_uri": "s3://x/"},
        "model": {
            "backbone": "test_efficientnet",
            "img_size": 32,
            "weights": "none",
            "freeze": "all_but_last:2",
            "tta": True,
        },
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "num_threads": 1,
            "num_workers": 0,
            "amp": "none",
            "flip_default": "d4",
            "cache_frozen": True,
            "sampler_power": 0.0,
        },
        "bag": {"seeds": [0, 1], "bootstrap": False, "folds": True},
    }
    cfg = config_from_dict(params)
    meta = run_train(
        cfg,
        tmp_path / "split.csv",
        tmp_path / "raw",
        1,
        tmp_path / "m1",
        tmp_path / "cache" / "images",
        tmp_path / "ckpt",
    )
    assert meta["cache_frozen"] is True and meta["tta_variants"] == list(range(8))
    split = load_split(tmp_path / "split.csv")
    assert (
        meta["train_images"]
        == len(member_indices(split.labels["train"], split.groups["train"], (0, 1), 1, False, True))
        < len(split.labels["train"])
    )
    assert len(list((tmp_path / "cache" / "features").glob("*/*.npy"))) > 0
    bag = BagPredictor.from_dirs([tmp_path / "m1"])
    assert bag.views(bag.members[0]) == list(range(8))
    # label_issues reads the training's frozen-layer cache: nothing recomputed, the direct path's probabilities
    from pipeline.core.data import build_cache

    imgs = {32: build_cache(tmp_path / "raw", split.paths["train"], split.sha256["train"], 32, None)}
    files = sorted((tmp_path / "cache" / "features").glob("*/*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    cached = bag.member_proba_arrays(imgs, shas=split.sha256["train"], feature_dir=tmp_path / "cache" / "features")
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache" / "features").glob("*/*.npy"))] == stamps
    np.testing.assert_allclose(cached[0], bag.member_proba_arrays(imgs)[0], atol=2e-2)
    assert json.loads((tmp_path / "m1" / "meta.json").read_text())["folds"] is True
    off = config_from_dict(
        yaml.safe_load(yaml.safe_dump({**params, "train": {**params["train"], "cache_frozen": False}}))
    )
    meta_off = run_train(
        off,
        tmp_path / "split.csv",
        tmp_path / "raw",
        1,
        tmp_path / "m1off",
        tmp_path / "cache2" / "images",
        tmp_path / "ckpt2",
    )
    assert meta_off["cache_frozen"] is False and not (tmp_path / "cache2" / "features").exists()


def test_members_sharing_frozen_layers_predict_as_each_would_alone():
    from pipeline.core.inference import BagPredictor, Member

    members = []
    for seed in (0, 1):
        model = _model()
        torch.manual_seed(100 + seed)  # different tails, same frozen prefix (the pretrained weights)
        for p in model.classifier.parameters():
            p.data.normal_()
        meta = {
            "img_size": 32,
            "class_names": ["a", "b", "c"],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "tta_variants": [0, 1, 5],
            "freeze": "all_but_last:2",
            "backbone": "test_efficientnet",
        }
        m = Member(model, meta)
        m.frozen = split_frozen(model, "all_but_last:2")
        m.frozen_id = prefix_key(m.frozen.prefix, "test_efficientnet", 32, meta["mean"], meta["std"], [])
        members.append(m)
    assert members[0].frozen_id == members[1].frozen_id
    bag = BagPredictor(members)
    assert bag._groups() == [[0, 1]]
    images = {32: np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)}
    shared = bag.member_proba_arrays(images)
    alone = [BagPredictor([m]).member_proba_arrays(images)[0] for m in members]
    for a, b in zip(shared, alone):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    np.testing.assert_allclose(bag.predict_proba_arrays(images), (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-6)


def test_val_tta_off_picks_the_epoch_on_the_plain_view_and_serving_keeps_every_view(tmp_path):
    """``train.val_tta: false`` caches and scores val in the plain view only; the saved model still averages all."""
    from pipeline.core.config import config_from_dict
    from pipeline.core.data import load_split
    from pipeline.stages.train import run_train
    from tests.integration.helpers import write_tiny_split

    write_tiny_split(tmp_path, per_class=8, val_per_class=2)
    params = {
        "data": {"landing_uri": "s3://x/"},
        "model": {"backbone": "test_efficientnet", "img_size": 32, "weights": "none", "freeze": "all_but_last:2"},
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "num_threads": 1,
            "num_workers": 0,
            "amp": "none",
            "flip_default": "d4",
            "val_tta": False,
        },
        "bag": {"seeds": [0]},
    }
    meta = run_train(
        config_from_dict(params), tmp_path / "split.csv", tmp_path / "raw", 0, tmp_path / "m", tmp_path / "c" / "i"
    )
    assert meta["tta_variants"] == list(range(8)) and meta["val_views"] == [0]
    val_shas = set(load_split(tmp_path / "split.csv").sha256["val"])
    assert val_shas
    shapes = {np.load(f).shape[0] for f in (tmp_path / "c" / "features").glob("*/*.npy") if f.stem in val_shas}
    assert shapes == {1}  # val's frozen maps: the plain view only
