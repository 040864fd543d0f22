"""``make gpu-check`` (bench/gpu_check.py) runs end to end at tiny size here, and a broken step never hides the rest.

The GPU is lent once for minutes: the script must not fail there for a reason a CPU run could have shown, and it
must report each step's own failure and go on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

TEXT_KEYS = {
    "DEVICE",
    "GPU",
    "TORCH",
    "TIMM",
    "CUDA",
    "PYTHON",
    "VARIANT",
    "MODEL",
    "OURS_RECIPE",
    "COMPILE_BACKEND",
    "PEAK_MEM_KIND",
    "TRAIN_DEVICE_RECORDED",
    "GPU_CHECK",
}
NUMERIC_KEYS = {
    "IMAGES",
    "CLASSES",
    "BATCH",
    "LOADER_WORKERS",
    "DATA_SECONDS",
    "SPLIT_TEST",
    "TRAIN_STAGE_SECONDS",
    "TRAIN_EPOCH_SECONDS",
    "TRAIN_EPOCH_IMAGES",
    "TRAIN_EPOCH_IMG_S",
    "TRAIN_PEAK_MEM_GB",
    "EVAL_IMAGES",
    "EVAL_SECONDS",
    "EVAL_IMG_S",
    "EVAL_WEIGHTED_F1",
    *(f"{k}_{v}" for k in ("TRAIN_IMG_S", "PEAK_MEM_GB") for v in ("PLAIN", "OURS", "OURS_COMPILE", "PLAIN_COMPILE")),
    "COMPILE_SECONDS_OURS_COMPILE",
    "COMPILE_SECONDS_PLAIN_COMPILE",
    "SPEEDUP_OURS",
    "SPEEDUP_OURS_COMPILE",
    "SPEEDUP_PLAIN_COMPILE",
    "EST_EPOCH_SECONDS_3457",
    "EST_EPOCH_SECONDS_3457_STEADY",
    "EST_BAG_3X20_HOURS",
    "TOTAL_SECONDS",
}
# What the GPU box lacks (the project's FACTS): importing any of them fails the run, as it would there.
ABSENT_ON_GPU_BOX = ("mlflow", "airflow", "dvc", "dvc_s3", "boto3", "botocore", "matplotlib", "great_expectations")
RUN_WITHOUT = """
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU box)")
sys.meta_path.insert(0, Absent())
sys.argv[0] = "gpu_check"
runpy.run_module("bench.gpu_check", run_name="__main__", alter_sys=True)
"""
STEPS = (
    "config",
    "device",
    "environment",
    "data",
    "split",
    "train",
    "evaluate",
    "bench",
    "bench_plain",
    "bench_ours",
    "bench_ours_compile",
    "bench_plain_compile",
)


def test_tiny_variant_prints_every_key_without_the_services_libraries(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"ABSENT = {set(ABSENT_ON_GPU_BOX)!r}" + RUN_WITHOUT
    proc = subprocess.run(
        [sys.executable, "-c", code, "--variant", "tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if "=" in ln]
    values = dict(ln.split("=", 1) for ln in lines)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[-1] == "GPU_CHECK=ok"
    assert {f"STEP_{s}" for s in STEPS} <= set(values) and all(values[f"STEP_{s}"] == "ok" for s in STEPS), values
    assert TEXT_KEYS <= set(values), TEXT_KEYS - set(values)
    assert values["VARIANT"] == "tiny" and values["MODEL"] == "test_efficientnet@32"
    for key in NUMERIC_KEYS:
        assert float(values[key]) == float(values[key]) and float(values[key]) >= 0, (key, values.get(key))
    assert float(values["TRAIN_EPOCH_IMAGES"]) > 0 and float(values["EVAL_IMAGES"]) > 0
    assert json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8")) == values


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path, capsys):
    from bench import gpu_check

    broken = gpu_check.dataclasses.replace(
        gpu_check.TINY, overrides={**gpu_check.TINY.overrides, "model": {"backbone": "no_such_model", "img_size": 32}}
    )
    assert gpu_check.run(broken, None, tmp_path) is False
    values = dict(ln.split("=", 1) for ln in capsys.readouterr().out.splitlines() if "=" in ln)
    assert values["STEP_data"] == "ok" and values["STEP_split"] == "ok"
    assert values["STEP_train"].startswith("failed: ") and "no_such_model" in values["STEP_train"]
    assert values["STEP_evaluate"] == "skipped: needs train"
    assert values["STEP_bench_plain"].startswith("failed: ")  # each benchmark variant reports its own failure
    assert values["STEP_bench_ours"].startswith("failed: ")
    assert values["GPU_CHECK"] == "failed"


def test_the_gpu_variant_without_cuda_fails_with_its_reason(tmp_path, capsys, monkeypatch):
    from bench import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.run(gpu_check.GPU, None, tmp_path) is False
    out = capsys.readouterr().out
    assert "STEP_device=failed: ConfigError: train.device is cuda, but torch" in out
    assert out.rstrip().endswith("GPU_CHECK=failed")
