"""Corrupt, truncated, altered or booby-trapped weight files are refused with a message, never loaded."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core import checkpoints
from pipeline.core.config import load_config
from pipeline.core.errors import CheckpointError
from tests.integration.helpers import write_tiny_split

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    """One tiny trained member (test_efficientnet @32px, 2 epochs) and its inputs."""
    from pipeline.stages.train import run_train

    ws = tmp_path_factory.mktemp("ckpt")
    write_tiny_split(ws, per_class=8, val_per_class=2)
    params = {
        "data": {"landing_uri": "s3://x/"},
        "model": {"backbone": "test_efficientnet", "img_size": 32, "weights": "none"},
        "train": {"epochs": 2, "batch_size": 4, "num_threads": 1, "num_workers": 0, "amp": "none", "patience": 10},
        "bag": {"seeds": [0]},
    }
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(ws / "params.yaml")
    run_train(
        cfg, ws / "split.csv", ws / "raw", 0, ws / "models" / "member_0", cache_dir=ws / "cache", ckpt_dir=ws / "ckpt"
    )
    return ws, cfg


def _copy_member(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_model_file_sha256_is_recorded_and_checked(member):
    from pipeline.core.inference import load_member

    ws, _ = member
    d = ws / "models" / "member_0"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["model_sha256"] == checkpoints.sha256_file(d / "model.pt")
    assert load_member(d).meta["backbone"] == "test_efficientnet"


def test_truncated_model_file_is_refused_with_its_name(member, tmp_path):
    from pipeline.core.inference import load_member

    ws, _ = member
    d = _copy_member(ws / "models" / "member_0", tmp_path / "m")
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt is corrupt or was altered: its SHA-256"):
        load_member(d)
    # An older member without a recorded checksum: the truncated file still cannot slip through.
    meta = json.loads((d / "meta.json").read_text())
    del meta["model_sha256"]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"cannot be read .*truncated or not a PyTorch file"):
        load_member(d)


def test_altered_but_loadable_weights_are_refused(member, tmp_path):
    """A file that still parses (weights changed after training) is caught by the recorded checksum."""
    from pipeline.core.inference import load_member

    ws, _ = member
    d = _copy_member(ws / "models" / "member_0", tmp_path / "m")
    state = torch.load(d / "model.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1.0
    torch.save(state, d / "model.pt")
    with pytest.raises(CheckpointError, match="corrupt or was altered"):
        load_member(d)


def test_weights_of_another_architecture_are_refused(member, tmp_path):
    from pipeline.core.inference import load_member

    ws, _ = member
    d = _copy_member(ws / "models" / "member_0", tmp_path / "m")
    meta = json.loads((d / "meta.json").read_text())
    meta.update(backbone="test_resnet")
    del meta["model_sha256"]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_member(d)


class _Trap:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    fp = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Trap(marker)}, fp)
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors"):
        checkpoints.load(fp, "model.weights file")
    assert not marker.exists()
    # The same file given as pretrained weights (model.weights=<path>) is refused the same way.
    from pipeline.core.models import create_model

    with pytest.raises(CheckpointError, match="Python objects"):
        create_model("test_efficientnet", 3, str(fp))
    assert not marker.exists()


def test_truncated_resume_checkpoint_is_refused_kept_aside_and_training_restarts(member, caplog):
    """A resume checkpoint cut short (disk full, killed mid-write by something other than our atomic rename)
    is not loaded: it is moved aside (nothing deleted) and the member trains from epoch 0 to the same result."""
    from pipeline.stages.train import run_train

    ws, cfg = member
    ckpt_dir = ws / "ckpt-trunc"
    ckpt_dir.mkdir()
    (ckpt_dir / "member_0.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        meta = run_train(cfg, ws / "split.csv", ws / "raw", 0, ws / "again", cache_dir=ws / "cache", ckpt_dir=ckpt_dir)
    assert "refusing resume checkpoint" in caplog.text and "training from epoch 0" in caplog.text
    aside = list(ckpt_dir.glob("member_0.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"PK\x03\x04 not really")
    assert meta["epochs_run"] == 2
    a = torch.load(ws / "models" / "member_0" / "model.pt", weights_only=True)
    b = torch.load(ws / "again" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
