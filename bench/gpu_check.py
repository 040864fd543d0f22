"""The reference recipe's GPU smoke run and train-step benchmark: ``make gpu-check``.

    python -m bench.gpu_check [--out DIR] [--variant auto|gpu|tiny] [--budget-s S] [--work DIR]

On CUDA (variant ``gpu``): a DACON-shaped set of 1,003 generated images (``devstack/dacon_fixture.py``), the split
stage's rule, ONE epoch of the train stage with the full profile's model (tf_efficientnetv2_m @384, weights none,
bf16, channels_last, 4 loader workers, batch 16), the member scored on the test split on the GPU, then a
train-step benchmark of that model: plain fp32 NCHW against our bf16 + channels_last, each eager and under
``torch.compile``. Without CUDA (variant ``tiny``) the same code runs at toy size: test_efficientnet @32, 124
images, fp32 + channels_last, and ``torch.compile`` with the ``eager`` backend, which traces the model as the GPU
run does but generates no code (inductor alone takes over a minute on a CPU). Tiny numbers are no performance
figures; they prove the script.

The GPU is lent once, for minutes, so every step reports its own outcome as ``STEP_<name>=ok``, ``failed: <reason>``
or ``skipped: <reason>`` and the steps that do not need a failed one still run. ``KEY=value`` lines are printed
as they are measured (a killed run keeps what it printed; ``--out DIR`` rewrites ``DIR/gpu_check.json`` after
every step); the last line is ``GPU_CHECK=ok|failed`` (exit code 0 or 1).

Run-time imports: torch, timm, numpy, PIL, scikit-learn, PyYAML, tqdm and, of this repository, the core, the
split and train stages and the DACON fixture; nothing of MLflow, Airflow, DVC, boto3 or matplotlib, which a bare
GPU box lacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DACON_TRAIN_IMAGES = 3457
BAG_EPOCHS = 3 * 20  # the reference bag: 3 members × 20 epochs
_logger = logging.getLogger("bench.gpu_check")


@dataclass(frozen=True)
class Plan:
    """What one variant runs; ``overrides`` go on top of the committed params.yaml (the full recipe)."""

    variant: str
    overrides: dict
    fixture: tuple[float, int]  # dacon_fixture (scale, floor): 1,003 images at (0.25, 28), 124 at (0, 2)
    warmup: int  # untimed steps per benchmark variant (cuDNN/allocator warm-up; the compile for compiled ones)
    steps: int  # timed steps; the median counts
    compile_backend: str
    compile_reserve_s: float  # a compiled variant starts only with this much of the time budget left
    budget_s: float


# The committed recipe's values, pinned so that the check measures what the brief names even if params change.
GPU = Plan(
    "gpu",
    {
        "model": {"backbone": "tf_efficientnetv2_m", "img_size": 384},
        "train": {"amp": "bf16", "channels_last": True, "num_workers": 4, "batch_size": 16, "device": "cuda"},
    },
    (0.25, 28),
    warmup=3,
    steps=10,
    compile_backend="inductor",
    compile_reserve_s=150,
    budget_s=420,
)
TINY = Plan(
    "tiny",
    {
        "model": {"backbone": "test_efficientnet", "img_size": 32},
        "train": {"amp": "none", "channels_last": True, "num_workers": 2, "batch_size": 16},
    },
    (0.0, 2),
    warmup=1,
    steps=3,
    compile_backend="eager",
    compile_reserve_s=5,
    budget_s=240,
)
COMMON = {
    "model": {"weights": "none", "freeze": "none"},
    "train": {"epochs": 1, "device": "auto"},
    "bag": {"seeds": [0], "bootstrap": True},
}


class Report:
    """Prints ``KEY=value`` lines, keeps them, and rewrites ``out_dir/gpu_check.json`` after each one."""

    def __init__(self, out_dir: Path | None):
        self.values: dict[str, str] = {}
        self.out_fp = out_dir / "gpu_check.json" if out_dir else None
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, value) -> None:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        self.values[key] = text
        print(f"{key}={text}", flush=True)
        if self.out_fp:
            self.out_fp.write_text(json.dumps(self.values, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    def step(self, name: str, fn, *needs: str):
        """Run ``fn()`` as step ``name`` unless a step it ``needs`` did not succeed; never raises."""
        missing = [n for n in needs if self.values.get(f"STEP_{n}") != "ok"]
        if missing:
            self.put(f"STEP_{name}", f"skipped: needs {', '.join(missing)}")
            return None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - a one-shot GPU run must report every step, whatever broke
            traceback.print_exc(file=sys.stderr)
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            self.put(f"STEP_{name}", f"failed: {type(exc).__name__}: {reason}")
            return None
        self.put(f"STEP_{name}", "ok")
        return out

    def ok(self) -> bool:
        return not any(v.startswith("failed") for k, v in self.values.items() if k.startswith("STEP_"))


def make_config(plan: Plan):
    from pipeline.core.config import REPLACED_WHOLE, config_from_dict, deep_merge, read_yaml

    raw = deep_merge(read_yaml(ROOT / "params.yaml"), COMMON)
    return config_from_dict(deep_merge(raw, plan.overrides, REPLACED_WHOLE))


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on a CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report_environment(rep: Report, plan: Plan, cfg, device: torch.device) -> None:
    import timm

    rep.put("DEVICE", device.type)
    rep.put("GPU", torch.cuda.get_device_name(device) if device.type == "cuda" else "none")
    rep.put("TORCH", torch.__version__)
    rep.put("TIMM", timm.__version__)
    rep.put("CUDA", torch.version.cuda or "none")
    rep.put("PYTHON", platform.python_version())
    rep.put("CPUS", os.cpu_count() or 0)
    rep.put("VARIANT", plan.variant)
    rep.put("MODEL", f"{cfg.model.backbone}@{cfg.model.img_size}")
    rep.put("BATCH", cfg.train.batch_size)
    rep.put("LOADER_WORKERS", cfg.train.num_workers)
    rep.put(
        "OURS_RECIPE",
        f"{'bf16' if cfg.train.amp == 'bf16' else 'fp32'}+{'channels_last' if cfg.train.channels_last else 'nchw'}",
    )
    rep.put("COMPILE_BACKEND", plan.compile_backend)
    rep.put("PEAK_MEM_KIND", "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_max_rss")


def make_data(rep: Report, plan: Plan, work: Path) -> Path:
    """The generated DACON-shaped tree; returns its ``train/`` folder (the raw dir the stages read)."""
    from devstack.dacon_fixture import write_dacon_tree

    start = time.perf_counter()
    counts = write_dacon_tree(work / "dacon", scale=plan.fixture[0], floor=plan.fixture[1])
    rep.put("IMAGES", sum(counts.values()))
    rep.put("CLASSES", len(counts))
    rep.put("DATA_SECONDS", time.perf_counter() - start)
    return work / "dacon" / "train"


def make_split(rep: Report, cfg, raw_dir: Path, work: Path) -> Path:
    """The split stage's function on a validated list of every generated image (class = NFC folder name)."""
    from pipeline.core.io import sha256_file, write_csv
    from pipeline.stages.split import run_split

    rows = [
        {
            "path": fp.relative_to(raw_dir).as_posix(),
            "class_name": unicodedata.normalize("NFC", fp.parent.name),
            "sha256": sha256_file(fp),
        }
        for fp in sorted(raw_dir.rglob("*"))
        if fp.is_file()
    ]
    write_csv(work / "validated.csv", rows, ["path", "class_name", "sha256"])
    report = run_split(cfg, work / "validated.csv", work / "split.csv", work / "split.json")
    for part in ("train", "val", "test"):
        rep.put(f"SPLIT_{part.upper()}", sum(report["counts"].get(part, {}).values()))
    return work / "split.csv"


def run_train_epoch(rep: Report, cfg, split_fp: Path, raw_dir: Path, work: Path, device: torch.device) -> Path:
    """One epoch of the train stage (bag member 0), as ``python -m pipeline train`` runs it."""
    from pipeline.stages.train import run_train

    reset_peak(device)
    start = time.perf_counter()
    meta = run_train(cfg, split_fp, raw_dir, 0, work / "member_0", cache_dir=work / "cache", ckpt_dir=work / "ckpt")
    rep.put("TRAIN_STAGE_SECONDS", time.perf_counter() - start)
    epoch = json.loads((work / "member_0" / "history.json").read_text(encoding="utf-8"))[0]
    rep.put("TRAIN_EPOCH_SECONDS", float(meta["train_seconds"]))  # training loop + validation
    rep.put("TRAIN_EPOCH_IMAGES", epoch["train_images"])
    rep.put("TRAIN_EPOCH_IMG_S", float(epoch["train_img_s"]))
    rep.put("TRAIN_PEAK_MEM_GB", peak_memory_gb(device))
    rep.put("TRAIN_DEVICE_RECORDED", meta["device"])
    est = DACON_TRAIN_IMAGES / epoch["train_img_s"]
    rep.put("EST_EPOCH_SECONDS_3457", est)
    rep.put("EST_BAG_3X20_HOURS", est * BAG_EPOCHS / 3600)
    return work / "member_0"


def evaluate_member(
    rep: Report, cfg, split_fp: Path, raw_dir: Path, member_dir: Path, work: Path, device: torch.device
) -> None:
    """The trained member scored on the test split on ``device``, through the bag predictor evaluate uses."""
    from sklearn.metrics import f1_score

    from pipeline.core.data import build_cache, load_split
    from pipeline.core.inference import BagPredictor

    split = load_split(split_fp)
    images = build_cache(raw_dir, split.paths["test"], split.sha256["test"], cfg.model.img_size, work / "cache")
    bag = BagPredictor.from_dirs([member_dir], device)
    bag.predict_proba_arrays({cfg.model.img_size: images[:8]})  # warm-up: kernels chosen, memory reserved
    sync(device)
    start = time.perf_counter()
    probs = bag.predict_proba_arrays({cfg.model.img_size: images})
    seconds = time.perf_counter() - start
    rep.put("EVAL_IMAGES", len(images))
    rep.put("EVAL_SECONDS", seconds)
    rep.put("EVAL_IMG_S", len(images) / max(seconds, 1e-9))
    rep.put(
        "EVAL_WEIGHTED_F1", float(f1_score(split.labels["test"], probs.argmax(1), average="weighted", zero_division=0))
    )


def bench_variant(rep: Report, plan: Plan, cfg, device: torch.device, name: str, ours: bool, compiled: bool) -> float:
    """Median train-step img/s of one variant: ``ours`` = the recipe's amp/channels_last, else fp32 NCHW."""
    from pipeline.core.engine import train_step
    from pipeline.core.losses import FocalLoss
    from pipeline.core.models import create_model

    train = cfg.train if ours else dataclasses.replace(cfg.train, amp="none", channels_last=False)
    vcfg = dataclasses.replace(cfg, train=train)
    torch.manual_seed(0)
    model, _ = create_model(cfg.model.backbone, 19, "none", "none")
    model = model.to(device, memory_format=torch.channels_last if train.channels_last else torch.contiguous_format)
    net = torch.compile(model, backend=plan.compile_backend) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    criterion = FocalLoss(cfg.train.focal_gamma, cfg.train.label_smoothing)
    batch, size = cfg.train.batch_size, cfg.model.img_size
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)  # what the loader hands over
    y = torch.randint(0, 19, (batch,))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    net.train()
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(plan.warmup):
        train_step(net, x, y, criterion, opt, None, vcfg, device, mean, std)
    sync(device)
    warm = time.perf_counter() - start
    times = []
    for _ in range(plan.steps):
        t = time.perf_counter()
        train_step(net, x, y, criterion, opt, None, vcfg, device, mean, std)
        sync(device)
        times.append(time.perf_counter() - t)
    img_s = batch / float(np.median(times))
    rep.put(f"TRAIN_IMG_S_{name}", img_s)
    rep.put(f"PEAK_MEM_GB_{name}", peak_memory_gb(device))
    if compiled:
        rep.put(f"COMPILE_SECONDS_{name}", warm)  # the compile happens in the first warm-up step
    del net, model, opt
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    return img_s


def run_benchmark(rep: Report, plan: Plan, cfg, device: torch.device, deadline: float) -> None:
    """Four variants; compiled ones last and only while the time budget allows (a compile takes minutes)."""
    variants = (
        ("PLAIN", False, False),
        ("OURS", True, False),
        ("OURS_COMPILE", True, True),
        ("PLAIN_COMPILE", False, True),
    )
    for name, ours, compiled in variants:
        left = deadline - time.monotonic()
        if compiled and left < plan.compile_reserve_s:
            rep.put(
                f"STEP_bench_{name.lower()}",
                f"skipped: {left:.0f} s of the time budget left, a compile needs about {plan.compile_reserve_s:.0f}",
            )
            continue
        rep.step(f"bench_{name.lower()}", lambda: bench_variant(rep, plan, cfg, device, name, ours, compiled))
    v = rep.values
    for name in ("OURS", "OURS_COMPILE", "PLAIN_COMPILE"):
        if _is_number(v.get(f"TRAIN_IMG_S_{name}")) and _is_number(v.get("TRAIN_IMG_S_PLAIN")):
            rep.put(f"SPEEDUP_{name}", float(v[f"TRAIN_IMG_S_{name}"]) / float(v["TRAIN_IMG_S_PLAIN"]))
    if _is_number(v.get("TRAIN_IMG_S_OURS")):
        rep.put("EST_EPOCH_SECONDS_3457_STEADY", DACON_TRAIN_IMAGES / float(v["TRAIN_IMG_S_OURS"]))


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and float(text) == float(text)
    except ValueError:
        return False


def choose_plan(variant: str, budget_s: float | None) -> Plan:
    if variant == "auto":
        variant = "gpu" if torch.cuda.is_available() else "tiny"
    plan = GPU if variant == "gpu" else TINY
    return dataclasses.replace(plan, budget_s=budget_s) if budget_s else plan


def run(plan: Plan, out_dir: Path | None, work: Path) -> bool:
    """Every step of the check; returns whether none failed."""
    started = time.monotonic()
    deadline = started + plan.budget_s
    _logger.info("gpu-check: %s variant, %.0f s budget, work dir %s", plan.variant, plan.budget_s, work)
    rep = Report(out_dir)
    cfg = rep.step("config", lambda: make_config(plan))
    if cfg is None:
        rep.put("GPU_CHECK", "failed")
        return False
    from pipeline.core.devices import resolve_device

    device = rep.step("device", lambda: resolve_device(cfg.train.device))
    if device is None:  # the gpu variant asks for cuda: without it there is nothing to check
        rep.put("GPU_CHECK", "failed")
        return False
    rep.step("environment", lambda: report_environment(rep, plan, cfg, device))
    raw_dir = rep.step("data", lambda: make_data(rep, plan, work))
    split_fp = rep.step("split", lambda: make_split(rep, cfg, raw_dir, work), "data")
    member = rep.step("train", lambda: run_train_epoch(rep, cfg, split_fp, raw_dir, work, device), "split")
    rep.step("evaluate", lambda: evaluate_member(rep, cfg, split_fp, raw_dir, member, work, device), "train")
    rep.step("bench", lambda: run_benchmark(rep, plan, cfg, device, deadline))
    rep.put("TOTAL_SECONDS", time.monotonic() - started)
    ok = rep.ok()
    rep.put("GPU_CHECK", "ok" if ok else "failed")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json (rewritten after every step)")
    parser.add_argument(
        "--variant", choices=("auto", "gpu", "tiny"), default="auto", help="auto: gpu where torch sees CUDA, else tiny"
    )
    parser.add_argument("--budget-s", type=float, help="time budget; compiled variants are skipped past it")
    parser.add_argument("--work", type=Path, help="keep the generated data and model here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    plan = choose_plan(args.variant, args.budget_s)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return 0 if run(plan, args.out, args.work) else 1
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        return 0 if run(plan, args.out, Path(tmp)) else 1


if __name__ == "__main__":
    sys.exit(main())
