"""DataLoader workers draw their own flips: different across workers, epochs and DDP ranks, the same on a rerun.

Before ``data.seed_worker`` every worker drew from a copy of the dataset's one numpy generator, so worker 1's
i-th image got exactly worker 0's i-th flips, and a loader of the next epoch repeated them again.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.data import CachedImageDataset, train_loader

pytestmark = pytest.mark.unit

N, SIDE, BATCH, WORKERS = 32, 8, 4, 2


def _marked_dataset() -> CachedImageDataset:
    """``N`` blank images with a marker in the top-left corner: where it ends up shows the flips applied."""
    images = np.zeros((N, SIDE, SIDE, 3), np.uint8)
    images[:, 0, 0] = 255
    return CachedImageDataset(images, [0] * N, flips=["both"], seed=0)


def _flip_code(img: torch.Tensor) -> int:
    """0 none, 1 horizontal, 2 vertical, 3 both."""
    ys, xs = np.nonzero(img[0].numpy())
    return int(xs[0] == SIDE - 1) + 2 * int(ys[0] == SIDE - 1)


def _flips_by_worker(seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The flips each worker applied in one epoch of a loader seeded with ``seed`` (as the train stage seeds it)."""
    loader = train_loader(_marked_dataset(), BATCH * world, None, seed, WORKERS, False, rank, world)
    per_worker: list[list[int]] = [[] for _ in range(WORKERS)]
    for b, (x, _) in enumerate(loader):  # workers hand out batches in turn: batch b came from worker b % WORKERS
        per_worker[b % WORKERS].extend(_flip_code(img) for img in x)
    return per_worker


def test_workers_epochs_and_ranks_draw_different_flips_and_a_rerun_the_same():
    epoch0 = _flips_by_worker(seed=1000)
    assert epoch0[0] != epoch0[1], f"two workers applied the same flips in the same order: {epoch0}"
    assert set(epoch0[0] + epoch0[1]) == {0, 1, 2, 3}  # "both": every flip occurs
    epoch1 = _flips_by_worker(seed=1001)  # the stage seeds each epoch's loader with member seed * 1000 + epoch
    assert epoch1[0] != epoch0[0] and epoch1[1] != epoch0[1], f"the next epoch repeated the flips: {epoch1}"
    assert _flips_by_worker(seed=1000) == epoch0, "the same seed drew other flips"
    rank0, rank1 = _flips_by_worker(1000, 0, 2), _flips_by_worker(1000, 1, 2)
    assert rank0[0] != rank1[0], "two DDP ranks applied the same flips"


def test_training_with_loader_workers_is_reproducible(tmp_path):
    """Two complete runs of the train stage with 2 loader workers (flips, CutMix) end with identical weights."""
    from pipeline.core import checkpoints
    from pipeline.core.config import config_from_dict
    from pipeline.stages.train import run_train
    from tests.integration.helpers import write_tiny_split

    write_tiny_split(tmp_path, per_class=8, val_per_class=2)
    params = {
        "data": {"landing_uri": "s3://x/"},
        "model": {"backbone": "test_efficientnet", "img_size": 32, "weights": "none"},
        "train": {
            "epochs": 2,
            "batch_size": 6,
            "num_workers": 2,
            "amp": "none",
            "channels_last": False,
            "flip_default": "both",
            "cutmix_prob": 0.5,
            "patience": 5,
            "device": "cpu",
        },
        "bag": {"seeds": [0], "bootstrap": True},
    }
    cfg = config_from_dict(params)
    states = []
    for run in ("a", "b"):
        meta = run_train(
            cfg,
            tmp_path / "split.csv",
            tmp_path / "raw",
            0,
            tmp_path / run,
            cache_dir=tmp_path / "cache",
            ckpt_dir=tmp_path / f"ckpt_{run}",
        )
        assert meta["amp"] == "none" and meta["channels_last"] is False and meta["device"] == "cpu"
        states.append(checkpoints.load(tmp_path / run / "model.pt", "model weights", meta["model_sha256"]))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
