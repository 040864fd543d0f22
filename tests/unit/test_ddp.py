"""The train stage under ``torchrun`` (DDP, gloo on CPU) trains the same model as one process.

Each rank takes positions ``rank::world`` of every global batch of the single-process sample order, BatchNorm
statistics are synchronised over the ranks and gradients averaged, so with augmentation that draws no random
numbers (no CutMix, no flips) two processes end where one does, up to float rounding. The reference run also
keeps its epoch-1 checkpoint, which a DDP run then resumes. The split has no val rows, so model.pt is the last
epoch's weights (with a val split it would be the best epoch's, often epoch 1 on this tiny set).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.config import config_from_dict
from pipeline.core.data import CachedImageDataset, ShardedBatchSampler, create_sampler, train_loader
from tests.integration.helpers import write_tiny_split

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 2
PARAMS = {
    "data": {"landing_uri": "s3://x/"},
    "model": {"backbone": "test_efficientnet", "img_size": 32, "weights": "none"},
    # cutmix_prob 0 and flips none: the only randomness left is the sample order, which all ranks share.
    "train": {
        "epochs": EPOCHS,
        "batch_size": 8,
        "num_threads": 1,
        "num_workers": 0,
        "amp": "none",
        "channels_last": False,
        "patience": 10,
        "cutmix_prob": 0.0,
        "flip_default": "none",
        "label_smoothing": 0.1,
    },
    "bag": {"seeds": [0], "bootstrap": False},
}
# Keeps a copy of every epoch checkpoint of the single-process reference run (the stage deletes its own).
KEEP_CHECKPOINTS = """
import shutil, sys
from pathlib import Path
import pipeline.core.checkpoints as c
_orig = c.save
def _keep(obj, path):
    out = _orig(obj, path)
    if isinstance(obj, dict) and "run_key" in obj:
        shutil.copy(path, Path("kept") / f"epoch{obj['state']['epoch']}.pt")
    return out
c.save = _keep
from pipeline.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _stage_args(out: str, ckpt: str) -> list[str]:
    return [
        "train",
        "--params",
        "params.yaml",
        "--split",
        "split.csv",
        "--raw-dir",
        "raw",
        "--member",
        "0",
        "--out-dir",
        out,
        "--cache-dir",
        "cache",
        "--ckpt-dir",
        ckpt,
    ]


def _run(cmd: list[str], ws: Path) -> str:
    proc = subprocess.run(
        cmd, cwd=ws, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _torchrun(ws: Path, out: str, ckpt: str, nproc: int = 2) -> str:
    return _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "pipeline",
            *_stage_args(out, ckpt),
        ],
        ws,
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny split (3 classes x 12 train PNGs: 4 steps of 8 per epoch) and the single-process reference run."""
    ws = tmp_path_factory.mktemp("ddp")
    write_tiny_split(ws, per_class=12)
    (ws / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (ws / "kept").mkdir()
    log = _run([sys.executable, "-c", KEEP_CHECKPOINTS, *_stage_args("single", "ckpt_single")], ws)
    assert "DDP" not in log
    return ws


@pytest.fixture(scope="module")
def unidentifiable() -> set[str]:
    """State-dict entries of the test model that training cannot pin down, found in float64.

    A BatchNorm bias followed by a 1x1 conv and a BatchNorm in train mode (three stride-2 blocks and the head of
    test_efficientnet) changes nothing the network computes in training: its exact gradient is 0. In float32 that
    gradient is rounding noise (~1e-7, above AdamW's eps 1e-8), which AdamW turns into steps of about ``lr`` in
    whichever direction the noise points; the following BatchNorm's running mean tracks the shift. So these
    entries differ between any two runs that round differently: on this set one process with 2 threads instead of 1
    differs in exactly these six entries by up to 6.4e-3, two processes (DDP) by up to 6.9e-3.
    """
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).double().train()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.abs().max().item() for n, p in model.named_parameters()}
    scale = float(np.median(list(grads.values())))
    gauge = {n for n, g in grads.items() if g < 1e-9 * scale}
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in gauge:
                p.add_(torch.randn_like(p))
        shifted = model(x)
    assert torch.allclose(shifted, out, atol=1e-9)  # they really do not change the train-mode output
    tracking = {k for k, v in model.named_buffers() if v.is_floating_point() and not torch.allclose(v, after[k])}
    assert gauge and all(n.endswith(".bias") for n in gauge)
    assert tracking and all(k.endswith(".running_mean") for k in tracking), tracking
    return gauge | tracking


def _assert_same_model(ref: Path, other: Path, unidentifiable: set[str]) -> None:
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(other / "model.pt", weights_only=True)
    assert list(a) == list(b)  # same keys in the same order: no "module." prefix, no extra buffers
    worst, loose = 0.0, 0.0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k  # BatchNorm step counters
            continue
        diff = (a[k] - b[k]).abs().max().item()
        if k in unidentifiable:  # a few AdamW steps of lr 7e-4 apart at most, not pinned down by the data
            loose = max(loose, diff)
            assert diff < 0.05, (k, diff)
            continue
        worst = max(worst, diff)
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), (k, diff)
    ha = json.loads((ref / "history.json").read_text())
    hb = json.loads((other / "history.json").read_text())
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb] == list(range(1, EPOCHS + 1))
    assert [h["train_images"] for h in ha] == [h["train_images"] for h in hb]
    for x, y in zip(ha, hb):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4), (ha, hb)
    print(
        f"\nmax |diff| over {len(a) - len(unidentifiable)} model.pt entries {worst:.3g} "
        f"(the {len(unidentifiable)} unidentifiable ones: {loose:.3g}); train_loss per epoch "
        f"{[h['train_loss'] for h in ha]} (1 process) vs {[h['train_loss'] for h in hb]} (DDP)"
    )


def test_torchrun_two_processes_train_the_single_process_model(ws, unidentifiable):
    started = time.perf_counter()
    log = _torchrun(ws, "ddp", "ckpt_ddp")
    print(f"torchrun (2 processes) took {time.perf_counter() - started:.1f} s")
    assert "DDP world_size 2 (gloo), 4 images per rank per step, global batch 8" in log
    assert log.count("member_0 epoch 1:") == 1, log  # rank 0 logs; rank 1 is quiet
    meta = json.loads((ws / "ddp" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert json.loads((ws / "single" / "meta.json").read_text())["world_size"] == 1
    _assert_same_model(ws / "single", ws / "ddp", unidentifiable)
    assert not (ws / "ckpt_ddp" / "member_0.pt").exists()  # removed once the outputs are written


def test_torchrun_resumes_a_single_process_checkpoint(ws, unidentifiable):
    """Checkpoints have one format: a DDP run picks up the reference's epoch-1 file and ends where it ended."""
    (ws / "ckpt_resume").mkdir()
    shutil.copy(ws / "kept" / "epoch1.pt", ws / "ckpt_resume" / "member_0.pt")
    log = _torchrun(ws, "resumed", "ckpt_resume")
    assert log.count("resuming member_0 from epoch 1") == 1, log
    _assert_same_model(ws / "single", ws / "resumed", unidentifiable)


def _batch_indices(labels: list[int], power: float, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The dataset indices in each batch the stage's loader yields on ``rank`` of ``world``."""
    seen: list[int] = []

    class Recording(CachedImageDataset):
        def __getitem__(self, i):
            seen.append(i)
            return super().__getitem__(i)

    dataset = Recording(np.zeros((len(labels), 2, 2, 3), np.uint8), labels)
    loader = train_loader(dataset, 8, create_sampler(labels, power, 1234), 1234, 0, False, rank, world)
    return [seen[-len(x) :] for x, _ in loader]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("power", [0.0, 1.0])  # plain shuffle and the weighted sampler
def test_rank_shards_of_each_step_make_up_the_single_process_batch(world, power):
    labels = [0] * 20 + [1] * 7 + [2] * 3
    single = _batch_indices(labels, power)
    shards = [_batch_indices(labels, power, r, world) for r in range(world)]
    assert len(single) == 3 and all(len(s) == len(single) for s in shards)  # 30 images, batch 8, drop_last
    for step, batch in enumerate(single):
        for r in range(world):
            assert shards[r][step] == batch[r::world]


def test_sharded_batch_sampler_cuts_a_partial_batch_to_equal_shards():
    assert list(ShardedBatchSampler(range(10), 8, False, 1, 2)) == [[1, 3, 5, 7], [9]]
    assert len(ShardedBatchSampler(range(10), 8, False, 1, 2)) == 2
    assert list(ShardedBatchSampler(range(11), 8, True, 0, 2)) == [[0, 2, 4, 6]]
    assert list(ShardedBatchSampler(range(9), 8, False, 0, 2)) == [[0, 2, 4, 6]]  # 1 left over: no 2 shards
    with pytest.raises(ValueError, match="does not split evenly"):
        ShardedBatchSampler(range(10), 6, True, 0, 4)


def test_batch_size_must_split_over_the_processes(tmp_path):
    from pipeline.core.distributed import Dist
    from pipeline.core.errors import ConfigError
    from pipeline.stages.train import _run_train

    cfg = config_from_dict(PARAMS)
    with pytest.raises(ConfigError, match=r"train\.batch_size 8 must be divisible .* \(WORLD_SIZE 3\)"):
        _run_train(Dist(rank=0, world=3), cfg, tmp_path / "split.csv", tmp_path, 0, tmp_path / "out", None, None, "")


def test_gloo_sync_batchnorm_keeps_timm_bn_act_layers_and_state_dict():
    """Without a process group the converted model computes exactly what the original does (activation kept)."""
    import timm

    from pipeline.core.distributed import GlooSyncBatchNorm, sync_batchnorm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    x = torch.randn(4, 3, 32, 32)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    want = model.train()(x)
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    converted = sync_batchnorm(model, torch.device("cpu"))
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, GlooSyncBatchNorm)
        for m in converted.modules()
    )
    assert list(converted.state_dict()) == list(ref_state)
    assert torch.equal(converted.train()(x), want)
