"""A training run killed with SIGKILL and restarted resumes from its last epoch checkpoint and ends with the
same model as an uninterrupted run (bit for bit on CPU: every epoch re-seeds from (seed, epoch))."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.integration.helpers import write_tiny_split

pytestmark = pytest.mark.integration
# Enough epochs that the poll below sees a mid-run checkpoint even when an epoch of this tiny model takes well
# under the poll interval (CI once saw a 4-epoch victim finish, and delete its checkpoint, between two polls).
EPOCHS = 12


@pytest.fixture()
def tiny_split(tmp_path):
    write_tiny_split(tmp_path, per_class=12, val_per_class=2)
    params = {
        "data": {"landing_uri": "s3://x/"},
        "model": {"backbone": "test_efficientnet", "img_size": 32, "weights": "none"},
        "train": {"epochs": EPOCHS, "batch_size": 4, "num_threads": 1, "num_workers": 0, "amp": "none", "patience": 10},
        "bag": {"seeds": [0]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _train(ws: Path, out: str, ckpt: str, log: str) -> subprocess.Popen:
    """Start a train run whose output goes to ``ws/log`` (a file: a pipe nobody reads can fill and stall it)."""
    with open(ws / log, "w") as fh:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
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
            ],
            cwd=ws,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def test_sigkill_then_restart_resumes_and_matches_uninterrupted(tiny_split):
    ws = tiny_split
    full = _train(ws, "full", "ckpt_full", "full.log")
    assert full.wait(timeout=600) == 0, (ws / "full.log").read_text()[-3000:]

    victim = _train(ws, "resumed", "ckpt_killed", "victim.log")
    ckpt = ws / "ckpt_killed" / "member_0.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert victim.poll() is None, "ended before a mid-run checkpoint: " + (ws / "victim.log").read_text()[-3000:]
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)["state"]
            if 1 <= state["epoch"] < EPOCHS - 2:
                break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=True)["state"]["epoch"]
    assert 1 <= killed_at < EPOCHS and not (ws / "resumed" / "model.pt").exists()

    again = _train(ws, "resumed", "ckpt_killed", "again.log")
    assert again.wait(timeout=600) == 0, (ws / "again.log").read_text()[-3000:]
    log = (ws / "again.log").read_text()
    assert f"resuming member_0 from epoch {killed_at}" in log
    a = torch.load(ws / "full" / "model.pt", weights_only=True)
    b = torch.load(ws / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((ws / "full" / "history.json").read_text())
    hb = json.loads((ws / "resumed" / "history.json").read_text())
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
