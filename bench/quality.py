"""Ablation of the CPU recipe on ELPV: each change alone against the old cpu-demo, all together, and a peer.

    python -m bench.quality                      # or: make bench-quality (about 1-1.5 h on 2 cores)
    python -m bench.quality --rows baseline,all  # a subset (names below)

ELPV (PyPI ``elpv-dataset``, all 2,624 images, 8 classes) goes through the real ``validate`` and ``split`` stages
once (cpu-demo's split: 70/15/15, seed 42); every row then trains the bag with the real ``train`` stage and scores
it with the real ``evaluate`` stage on the same test images, each row in a fresh process with its own caches
(so a row's wall time includes decoding the images and, where it applies, computing the frozen layers).

Rows: ``baseline`` is the cpu-demo profile as it was before this benchmark (160 px, 4 epochs, 2 bootstrap members,
sampler power 1, flips, no frozen-layer cache, no TTA, glibc's default malloc). Each other row changes one thing
(``+224px`` keeps the frozen-layer cache, which pays for it); ``all`` is the committed cpu-demo profile (one
member on all train images), ``all-*`` rows change one thing of it (member seed, 3 fold members, 3 full members,
the epoch picked on the plain val view). ``peer`` is a plain timm fine-tune of the same pretrained
efficientnet_lite0 (timm's public factories in train.py's default loop: create_transform, AdamW, step decay 0.8
per epoch, label smoothing 0.1, channels_last, 224 px, all layers trained, best epoch by val accuracy), given
the same wall-clock training time as ``all`` and the same allocator; timm's own train.py is not in its wheel or
sdist and no repository is reachable here.

Every F1 is on the same test images; ``Δ`` and its 95 % interval are a paired bootstrap (the gate's,
``pipeline.core.gate_stats``) of the row against ``baseline``. Writes ``results.json`` under ``--out`` and the
table into docs/BENCHMARKS.md ("Quality ablation").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".local" / "bench" / "quality"
TUNED = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
DATA = {"data": {"landing_uri": "s3://bench/elpv/"}, "train": {"num_threads": 2}}
# The cpu-demo profile before this benchmark (git show 18ef2e3:profiles/cpu-demo.yaml), spelled out key by key.
BASELINE = {
    "model": {"img_size": 160, "tta": False},
    "train": {
        "epochs": 4,
        "sampler_power": 1.0,
        "flip_default": "both",
        "cache_frozen": False,
        "focal_gamma": 2.0,  # the recipe's focal loss and CutMix, which the old profile kept and the new one drops
        "cutmix_prob": 0.5,
    },
    "bag": {"seeds": [0, 1], "bootstrap": True, "folds": False},
}
ROWS: dict[str, tuple[str, dict | None, bool]] = {  # name -> (what changed, overrides or None = cpu-demo, tuned)
    "baseline": ("old cpu-demo (160 px, 4 epochs, 2 bootstrap members)", BASELINE, False),
    "+malloc": ("+ glibc malloc thresholds (PIPELINE_MALLOC)", BASELINE, True),
    "+cache": ("+ frozen layers cached (train.cache_frozen)", {"train": {"cache_frozen": True}}, True),
    "+224px": (
        "+ 224 px (model.img_size), with the cache",
        {"model": {"img_size": 224}, "train": {"cache_frozen": True}},
        True,
    ),
    "+power0": ("+ sampler power 0 (train.sampler_power)", {"train": {"sampler_power": 0.0}}, True),
    "+d4tta": (
        "+ 8 symmetries and TTA (flip_default d4, model.tta)",
        {"train": {"flip_default": "d4"}, "model": {"tta": True}},
        True,
    ),
    "+ce": ("+ cross-entropy instead of focal loss (train.focal_gamma 0)", {"train": {"focal_gamma": 0.0}}, True),
    "+nocutmix": ("+ no CutMix (train.cutmix_prob 0)", {"train": {"cutmix_prob": 0.0}}, True),
    "+folds": (
        "+ 3 fold members instead of 2 bootstrap ones (bag.folds)",
        {"bag": {"seeds": [0, 1, 2], "bootstrap": False, "folds": True}},
        True,
    ),
    "all": ("cpu-demo profile (all of the above, one member on all train images)", None, True),
    "all-folds3": (
        "cpu-demo with 3 fold members (bag.seeds [0, 1, 2], bag.folds true; the profile until 2026-12-08)",
        {"bag": {"seeds": [0, 1, 2], "folds": True}},
        True,
    ),
    "all-3full": (
        "cpu-demo with 3 members, each on all train images (bag.seeds [0, 1, 2])",
        {"bag": {"seeds": [0, 1, 2]}},
        True,
    ),
    "all-seed1": ("cpu-demo, member seed 1", {"bag": {"seeds": [1]}}, True),
    "all-valplain": (
        "cpu-demo, best epoch picked on the plain val view (train.val_tta false)",
        {"train": {"val_tta": False}},
        True,
    ),
}


def _say(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def row_params(name: str) -> dict:
    from pipeline.adapters.profiles import merged_params
    from pipeline.core.config import deep_merge

    _, overrides, _ = ROWS[name]
    if name.startswith("all"):  # the committed cpu-demo profile, changed by its overrides
        over = deep_merge(DATA, overrides or {})
    else:
        over = deep_merge(deep_merge(DATA, BASELINE), overrides)
    params = merged_params(ROOT, "cpu-demo", over)
    params["backbones"] = {}  # the bag only
    return params


def prepare(out: Path, t0: float) -> Path:
    """ELPV laid out, validated and split once; returns the split file every row uses."""
    from bench.label_noise import lay_out_elpv
    from pipeline.core.config import config_from_dict
    from pipeline.stages.split import run_split
    from pipeline.stages.validate import run_validate

    split_fp = out / "data" / "split.csv"
    if split_fp.exists():
        return split_fp
    cfg = config_from_dict(row_params("baseline"))
    data = out / "data"
    n = lay_out_elpv(out / "raw", data / "manifest.csv", 0)
    report = run_validate(
        cfg,
        out / "raw",
        data / "manifest.csv",
        data / "ingest_rejects.csv",
        data / "validated.csv",
        data / "quarantine.csv",
        data / "validation.json",
    )
    run_split(cfg, data / "validated.csv", split_fp, data / "split.json")
    _say(f"ELPV: {n} images, {report['validated']} validated, split written", t0)
    return split_fp


def run_row(name: str, out: Path, split_fp: Path) -> dict:
    """One row in this process: the train stage per member, then evaluate (called in a fresh subprocess)."""
    import torch

    from pipeline.core.config import config_from_dict
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.paths import member_dirs
    from pipeline.stages.train import run_train

    torch.set_num_threads(2)
    cfg = config_from_dict(row_params(name))
    work = out / "rows" / name
    cache = work / ".cache" / "images"
    started = time.perf_counter()
    fault0 = _rusage()
    metas = [
        run_train(cfg, split_fp, out / "raw", seed, d, cache, work / ".checkpoints")
        for seed, d in zip(cfg.bag.seeds, member_dirs(cfg.bag.seeds, work / "models"))
    ]
    train_s = time.perf_counter() - started
    metrics = run_evaluate(cfg, split_fp, out / "raw", work / "models", work / "eval.json", work / "reports", cache)
    total_s = time.perf_counter() - started
    fault1 = _rusage()
    import csv

    with open(work / "reports" / "predictions.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    per_class = json.loads((work / "reports" / "per_class.json").read_text(encoding="utf-8"))
    return {
        "name": name,
        "weighted_f1": metrics["weighted_f1"],
        "val_weighted_f1": metrics["val"].get("weighted_f1"),
        "macro_f1": metrics["macro_f1"],
        "accuracy": metrics["accuracy"],
        "n_test": metrics["n_test"],
        "per_class_f1": {r["class_name"]: r["f1"] for r in per_class},
        "actual": [r["actual"] for r in rows],
        "predicted": [r["predicted"] for r in rows],
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(total_s, 1),
        "minor_faults": fault1[0] - fault0[0],
        "system_seconds": round(fault1[1] - fault0[1], 1),
        "malloc": os.environ.get("GLIBC_TUNABLES", ""),
        "members": [
            {
                k: m.get(k)
                for k in (
                    "seed",
                    "img_size",
                    "epochs_run",
                    "best_epoch",
                    "train_images",
                    "cache_frozen",
                    "tta_variants",
                    "train_seconds",
                )
            }
            for m in metas
        ],
    }


def _rusage() -> tuple[int, float]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


def run_peer(out: Path, split_fp: Path, budget_s: float) -> dict:
    """A plain timm fine-tune of the PyPI efficientnet_lite0 weights for ``budget_s`` seconds of training."""
    import numpy as np
    import timm
    import timm.data
    import timm.loss
    import timm.optim
    import timm.scheduler
    import torch
    from PIL import Image
    from sklearn.metrics import accuracy_score, f1_score

    from pipeline.core.data import load_split
    from pipeline.core.models import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    split = load_split(split_fp)
    raw = out / "raw"
    model, _ = create_model("efficientnet_lite0", len(split.class_names), "pypi", "none")
    model = model.to(memory_format=torch.channels_last)
    data_cfg = timm.data.resolve_data_config({"input_size": (3, 224, 224)}, model=model)
    train_tf = timm.data.create_transform(**data_cfg, is_training=True)
    eval_tf = timm.data.create_transform(**data_cfg, is_training=False)

    def load(which: str, tf) -> list:
        return [(raw / p, y) for p, y in zip(split.paths[which], split.labels[which])], tf

    def batches(items, tf, bs, shuffle, rng):
        order = rng.permutation(len(items)) if shuffle else np.arange(len(items))
        for i in range(0, len(order), bs):
            chunk = [items[j] for j in order[i : i + bs]]
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in chunk])
            yield x.contiguous(memory_format=torch.channels_last), torch.tensor([y for _, y in chunk])

    def predict(items):
        model.eval()
        preds = []
        with torch.no_grad():
            for x, _ in batches(items, eval_tf, 64, False, None):
                preds.append(model(x).argmax(1))
        return torch.cat(preds).numpy()

    train_items, _ = load("train", train_tf)
    val_items, _ = load("val", eval_tf)
    test_items, _ = load("test", eval_tf)
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=7e-4, weight_decay=0.05)
    sched, _ = timm.scheduler.create_scheduler_v2(opt, "step", num_epochs=100, decay_epochs=1, decay_rate=0.8)
    loss_fn = timm.loss.LabelSmoothingCrossEntropy(0.1)
    rng = np.random.default_rng(0)
    started, epoch, best_acc, best_state, history = time.perf_counter(), 0, -1.0, None, []
    while time.perf_counter() - started < budget_s:
        model.train()
        for x, y in batches(train_items, train_tf, 32, True, rng):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.perf_counter() - started >= budget_s:
                break
        else:
            epoch += 1
            sched.step(epoch)
            acc = float(accuracy_score(split.labels["val"], predict(val_items)))
            history.append({"epoch": epoch, "val_accuracy": acc, "seconds": round(time.perf_counter() - started)})
            if acc > best_acc:
                best_acc, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
            continue
        break  # the budget ran out inside an epoch: that partial epoch is not kept
    train_s = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    pred = predict(test_items)
    val_f1 = float(f1_score(split.labels["val"], predict(val_items), average="weighted", zero_division=0))
    names = split.class_names
    y = split.labels["test"]
    per_class = f1_score(y, pred, average=None, labels=list(range(len(names))), zero_division=0)
    return {
        "name": "peer",
        "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "val_weighted_f1": val_f1,
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
        "n_test": len(y),
        "per_class_f1": {c: float(per_class[i]) for i, c in enumerate(names)},
        "actual": [names[i] for i in y],
        "predicted": [names[i] for i in pred],
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "epochs_completed": epoch,
        "history": history,
        "malloc": os.environ.get("GLIBC_TUNABLES", ""),
    }


def _subprocess(args: list[str], tuned: bool, log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tuned:
        env["GLIBC_TUNABLES"] = TUNED
    result = log.with_suffix(".json")
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.quality", *args, "--result", str(result)],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed: see {log}")
    return json.loads(result.read_text())


def table(results: dict[str, dict]) -> str:
    from pipeline.core.gate_stats import paired_bootstrap

    base = results.get("baseline")
    classes = sorted(next(iter(results.values()))["per_class_f1"])
    lines = [
        "| row | what changed | val wF1 | test wF1 | Δ vs baseline [95 % CI] | macro F1 | train s | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        what = (
            ROWS[name][0]
            if name in ROWS
            else (f"plain timm fine-tune, same training seconds as `all`, {r.get('epochs_completed')} epochs completed")
        )
        if base is not None and name != "baseline":
            assert r["actual"] == base["actual"], "rows scored different test images"
            s = paired_bootstrap(r["actual"], r["predicted"], base["predicted"])
            delta = f"{s.delta:+.4f} [{s.ci_low:+.4f}, {s.ci_high:+.4f}]"
        else:
            delta = "—"
        lines.append(
            f"| `{name}` | {what} | {_f4(r.get('val_weighted_f1'))} | {r['weighted_f1']:.4f} | {delta} | "
            f"{r['macro_f1']:.4f} | "
            f"{r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |"
        )
    lines += ["", "Per-class F1 (test):", "", "| row | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name, r in results.items():
        lines.append(f"| `{name}` | " + " | ".join(f"{r['per_class_f1'][c]:.2f}" for c in classes) + " |")
    if "all" in results and "peer" in results:
        s = paired_bootstrap(results["all"]["actual"], results["all"]["predicted"], results["peer"]["predicted"])
        lines += [
            "",
            f"`all` against `peer`: ΔwF1 {s.delta:+.4f} (95 % CI {s.ci_low:+.4f} to {s.ci_high:+.4f}), "
            f"P(Δ > 0) = {s.p_improve:.3f}, n = {s.n}.",
        ]
    return "\n".join(lines)


def _f4(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def write_doc(text: str, command: str) -> None:
    doc = ROOT / "docs" / "BENCHMARKS.md"
    body = doc.read_text(encoding="utf-8")
    start, end = "<!-- bench-quality:start -->", "<!-- bench-quality:end -->"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}"
    block = f"{start}\n`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}):\n\n{text}\n{end}"
    body = (
        body[: body.index(start)] + block + body[body.index(end) + len(end) :]
        if start in body
        else body.rstrip("\n") + "\n\n## Quality ablation\n\n" + block + "\n"
    )
    doc.write_text(body, encoding="utf-8")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--rows", default=",".join([*ROWS, "peer"]), help="comma-separated row names")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    ap.add_argument("--peer-budget", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    split_fp = args.out / "data" / "split.csv"
    if args.row:
        res = (
            run_peer(args.out, split_fp, args.peer_budget)
            if args.row == "peer"
            else run_row(args.row, args.out, split_fp)
        )
        args.result.write_text(json.dumps(res, ensure_ascii=False) + "\n")
        return 0
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.out, t0)
    results_fp = args.out / "results.json"
    results: dict[str, dict] = json.loads(results_fp.read_text()) if results_fp.exists() else {}
    wanted = [r for r in args.rows.split(",") if r]
    for name in wanted:
        if name != "peer" and name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; known: {', '.join([*ROWS, 'peer'])}")
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        if name == "peer":
            if "all" not in results:
                raise SystemExit("the peer's budget is row `all`'s training time: run row all first")
            budget = results["all"]["train_seconds"]
            r = _subprocess(
                ["--out", str(args.out), "--row", "peer", "--peer-budget", str(budget)], True, logs / "peer.log"
            )
        else:
            r = _subprocess(["--out", str(args.out), "--row", name], ROWS[name][2], logs / f"{name}.log")
        results[name] = r
        results_fp.write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n")
        _say(
            f"{name}: test wF1 {r['weighted_f1']:.4f}, macro {r['macro_f1']:.4f}, train {r['train_seconds']:.0f} s, "
            f"wall {r['wall_seconds']:.0f} s",
            t0,
        )
    order = [n for n in [*ROWS, "peer"] if n in results]
    if not order:  # `--rows ""`: the split only
        return 0
    text = table({n: results[n] for n in order})
    print(text)
    if not args.no_doc:
        write_doc(text, "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
