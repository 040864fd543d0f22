"""Device choice and placement: ``train.device`` / ``PIPELINE_DEVICE``, every tensor on the batch's device.

No GPU here, so placement is checked on torch's ``meta`` device: a tensor made on the CPU instead of the batch's
device fails there as it would on CUDA ("Expected all tensors to be on the same device"), without computing
anything. CPU inference must stay exactly what it was (fp32 NCHW), whatever the member trained with.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.core.config import config_from_dict
from pipeline.core.data import normalize_batch
from pipeline.core.devices import autocast, env_device, resolve_device
from pipeline.core.errors import ConfigError

pytestmark = pytest.mark.unit

META = torch.device("meta")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cfg(**train):
    return config_from_dict({"data": {"landing_uri": "s3://x/"}, "train": train})


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_picks_cuda_only_where_torch_sees_a_gpu(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_and_cuda_pick_the_gpu_where_there_is_one(fake_cuda):
    assert resolve_device("auto").type == "cuda" and resolve_device("cuda").type == "cuda"
    assert resolve_device("cpu").type == "cpu"  # an explicit cpu wins over a present GPU


def test_cuda_without_a_gpu_is_an_error_naming_the_key(no_cuda, monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.device is cuda, but torch .* sees no CUDA device"):
        resolve_device("cuda", "train.device")
    monkeypatch.setenv("PIPELINE_DEVICE", "cuda")
    with pytest.raises(ConfigError, match="PIPELINE_DEVICE is cuda"):
        env_device()
    monkeypatch.setenv("PIPELINE_DEVICE", "gpu")
    with pytest.raises(ConfigError, match="PIPELINE_DEVICE must be one of auto, cpu, cuda, got 'gpu'"):
        env_device()
    monkeypatch.delenv("PIPELINE_DEVICE")
    assert env_device() == torch.device("cpu")


def test_params_refuse_an_unknown_device():
    assert _cfg().train.device == "auto"
    with pytest.raises(ConfigError, match=r"train\.device must be one of .*'gpu'"):
        _cfg(device="gpu")


def test_train_stage_refuses_cuda_without_a_gpu_before_anything_else(no_cuda, tmp_path):
    from pipeline.stages.train import run_train

    with pytest.raises(ConfigError, match=r"train\.device is cuda"):
        run_train(_cfg(device="cuda"), tmp_path / "split.csv", tmp_path, 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ddp_device_follows_train_device_not_gpu_presence(fake_cuda, monkeypatch):
    from pipeline.core.distributed import Dist, init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # single process: nothing to join
    assert Dist(device_type="cpu").device() == torch.device("cpu")  # cpu asked for, GPU present
    assert init_distributed("cuda").device() == torch.device("cuda")
    assert Dist(rank=1, local_rank=1, world=2, device_type="cuda").device() == torch.device("cuda:1")


def test_autocast_follows_the_device_type():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available, disabling autocast" on this machine
        ctx = autocast(torch.device("cuda"), "bf16")
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert autocast(torch.device("cpu"), "bf16").device == "cpu"
    assert not isinstance(autocast(torch.device("cuda"), "none"), torch.autocast)


def test_normalize_batch_makes_mean_and_std_on_the_batch_device():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device=META)
    out = normalize_batch(x, MEAN, STD, channels_last=True)
    assert out.device == META and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    cpu = normalize_batch(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), MEAN, STD, channels_last=False)
    assert torch.allclose(cpu[0, :, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))


def test_a_train_step_runs_on_the_batch_device():
    """Batch, targets, CutMix, focal loss, autocast choice and AdamW all stay on the device (meta here)."""
    import timm
    from timm.data import Mixup

    from pipeline.core.engine import train_step
    from pipeline.core.losses import FocalLoss

    with META:
        model = timm.create_model("test_efficientnet", num_classes=3)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.1, num_classes=3)
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)  # the loader's CPU batch
    y = torch.tensor([0, 1, 2, 0])
    cfg = _cfg(amp="none", channels_last=True)
    loss = train_step(model, x, y, FocalLoss(2.0, 0.1), opt, mixup, cfg, META, MEAN, STD)
    assert loss.device == META and loss.shape == ()
    assert all(p.grad.device == META for p in model.parameters())
    assert all(s["exp_avg"].device == META for s in opt.state.values())


def test_focal_loss_builds_its_targets_on_the_logits_device():
    from pipeline.core.losses import FocalLoss

    logits = torch.zeros(4, 5, device=META)
    assert FocalLoss(2.0, 0.1)(logits, torch.zeros(4, dtype=torch.long, device=META)).device == META


def _member(meta_extra: dict, device=torch.device("cpu")):
    import timm

    from pipeline.core.inference import Member

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    meta = {"img_size": 32, "class_names": ["a", "b", "c"], "mean": list(MEAN), "std": list(STD), **meta_extra}
    return Member(model, meta).to(device)


def test_bag_inference_runs_on_the_members_device():
    from pipeline.core.inference import BagPredictor

    m = _member({"amp": "none", "channels_last": False}, META)
    assert next(m.model.parameters()).device == META
    batch = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)  # decoded images arrive on the CPU
    probs = BagPredictor([m]).member_probs(m, batch)
    assert probs.device == META and probs.shape == (2, 3) and probs.dtype == torch.float32


def test_members_compute_as_trained_on_a_gpu_and_fp32_nchw_on_a_cpu():
    m = _member({"amp": "bf16", "channels_last": True})
    assert (m.amp, m.channels_last) == ("none", False)  # CPU: the recorded recipe is ignored
    m.device = torch.device("cuda")  # (not moved: no GPU here) what a CUDA member would run with
    assert (m.amp, m.channels_last) == ("bf16", True)
    old = _member({})  # a member from before meta.json recorded amp/channels_last
    old.device = torch.device("cuda")
    assert (old.amp, old.channels_last) == ("none", False)


def test_cpu_bag_inference_is_bit_for_bit_what_it_was():
    """The computation inference did before devices existed, against BagPredictor with a bf16/channels_last member."""
    from pipeline.core.inference import BagPredictor

    m = _member({"amp": "bf16", "channels_last": True})
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got = BagPredictor([m]).predict_proba_arrays({32: images}, batch_size=4)
    want = []
    with torch.no_grad():
        for i in range(0, 5, 4):  # verbatim the former loop body
            x = torch.from_numpy(np.array(images[i : i + 4])).permute(0, 3, 1, 2)
            x = x.float().div_(255)
            x = (x - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
            want.append(torch.softmax(m.model(x).float(), dim=1).numpy())
    assert np.array_equal(got, np.concatenate(want))
