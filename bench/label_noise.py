"""Seeded label noise on ELPV: does ``data.exclude_label_issues`` win back what the noise costs?

    python -m bench.label_noise                 # or: make bench-label-noise (~15 min on 2 cores)
    python -m bench.label_noise --limit-per-class 20 --epochs 1    # a smoke run in a few minutes

ELPV (PyPI ``elpv-dataset``, 8 classes) goes through the real stages on a local workspace (no servers):
validate → split, then 10 % of the TRAIN images get a seeded random other class (val and test stay clean; the
noisy split is checked to hold exactly the clean split's val and test images). Three trainings, same profile, same
seeds, same test split:

* (a) noisy labels: the bag (``train`` stage per member), ``evaluate``, ``label_issues``;
* (b) noisy minus flagged: the (a) report's flagged images through
  :func:`pipeline.stages.label_exclusions.exclusion_rows` into ``split --exclusions`` (exactly what
  ``data.exclude_label_issues: true`` does on the next run), then the bag and ``evaluate``;
* (c) clean labels: the bag and ``evaluate``.

Prints progress and a table; writes ``results.json`` under the output folder (``.local/bench/label_noise`` by
default, git-ignored). Precision = flagged images that were flipped / flagged (val images can be flagged too: they
count against precision); recall = flipped images flagged / flipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".local" / "bench" / "label_noise"


def _say(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def build_config(epochs: int, img_size: int, seeds: list[int], threads: int):
    from pipeline.adapters.profiles import merged_params
    from pipeline.core.config import config_from_dict

    overrides = {
        "bag": {"seeds": seeds, "bootstrap": False, "folds": True},
        "train": {"num_threads": threads, **({"epochs": epochs} if epochs else {})},
        "model": {"img_size": img_size} if img_size else {},
        "data": {"landing_uri": "s3://bench/elpv/"},
    }
    params = merged_params(ROOT, "cpu-demo", overrides)
    params["backbones"] = {}  # the bag only: evaluate scores no single backbones here
    return config_from_dict(params), params


def lay_out_elpv(raw_dir: Path, manifest_fp: Path, limit_per_class: int) -> int:
    """ELPV as ``raw/<class>/<file>`` (symlinks to the installed PNGs) and an ingest-style manifest."""
    from devstack.demo_data import load_elpv_items
    from pipeline.adapters.storage import ObjectInfo
    from pipeline.core.io import write_csv
    from pipeline.stages.ingest import MANIFEST_FIELDS, _describe

    rows = []
    for item in load_elpv_items(limit_per_class):
        rel = f"{item.class_name}/{item.path.name}"
        dst = raw_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(item.path)
        rows.append(_describe(dst, rel, item.class_name, ObjectInfo(rel, "", item.path.stat().st_size)))
    write_csv(manifest_fp, rows, MANIFEST_FIELDS)
    return len(rows)


def flip_train_labels(
    validated: list[dict], clean_split: list[dict], fraction: float, seed: int
) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """``validated`` with ``fraction`` of the clean split's train images given a random other class (seeded)."""
    n_flip = round(fraction * sum(r["split"] == "train" for r in clean_split))
    classes = sorted({r["class_name"] for r in validated})
    # Only images alone in their duplicate group: a flipped near-duplicate would leave its group (groups never span
    # classes), get a split of its own and could land in test, and the three runs would not share one test split.
    size = Counter(r["group"] for r in clean_split)
    train = sorted(r["path"] for r in clean_split if r["split"] == "train" and size[r["group"]] == 1)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(train), size=n_flip, replace=False).tolist())
    given = {r["path"]: r["class_name"] for r in validated}
    flips = {}
    for i in chosen:
        path = train[i]
        others = [c for c in classes if c != given[path]]
        flips[path] = (given[path], others[int(rng.integers(len(others)))])
    noisy = [dict(r, class_name=flips[r["path"]][1]) if r["path"] in flips else dict(r) for r in validated]
    return noisy, flips


def held_out(split_rows: list[dict]) -> set[tuple[str, str, str]]:
    return {(r["path"], r["class_name"], r["split"]) for r in split_rows if r["split"] in ("val", "test")}


def train_and_evaluate(cfg, name: str, split_fp: Path, raw_dir: Path, work: Path, cache: Path, t0: float) -> dict:
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.paths import member_dirs
    from pipeline.stages.train import run_train

    models = work / "models"
    for seed, out_dir in zip(cfg.bag.seeds, member_dirs(cfg.bag.seeds, models)):
        if (out_dir / "model.pt").exists():
            _say(f"{name}: member_{seed} already trained, reused", t0)
            continue
        meta = run_train(cfg, split_fp, raw_dir, seed, out_dir, cache, work / ".checkpoints")
        best = meta.get("best_val_weighted_f1")
        _say(
            f"{name}: member_{seed} trained (best val weighted F1 {best if best is None else round(best, 4)}, "
            f"{meta.get('train_seconds', 0):.0f} s)",
            t0,
        )
    metrics = run_evaluate(
        cfg, split_fp, raw_dir, models, work / "metrics" / "eval.json", work / "reports" / "eval", cache
    )
    _say(
        f"{name}: test weighted F1 {metrics['weighted_f1']:.4f} (macro {metrics['macro_f1']:.4f}, "
        f"n_test {metrics['n_test']})",
        t0,
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    measure(argv)
    return 0


def run() -> dict[str, str]:
    """``python -m bench label-noise``: the default recipe, as ``KEY=value`` results for docs/BENCHMARKS.md."""
    r = measure([])
    f, w = r["finder"], r["weighted_f1"]
    gap = r["gap_recovered"]
    return {
        "LABEL_NOISE_FLAGGED": str(f["flagged"]),
        "LABEL_NOISE_PRECISION": f"{f['precision']:.3f}",
        "LABEL_NOISE_RECALL": f"{f['recall']:.3f}",
        "LABEL_NOISE_WF1_NOISY": f"{w['a_noisy']:.4f}",
        "LABEL_NOISE_WF1_NOISY_MINUS_FLAGGED": f"{w['b_noisy_minus_flagged']:.4f}",
        "LABEL_NOISE_WF1_CLEAN": f"{w['c_clean']:.4f}",
        "LABEL_NOISE_GAP_RECOVERED": "n/a" if gap is None else f"{gap:.3f}",
        "LABEL_NOISE_WALL_S": f"{r['wall_seconds']:.0f}",
    }


def measure(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.label_noise", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--limit-per-class", type=int, default=150, help="first N ELPV images per class (0 = all 2,624; 150 = 973)"
    )
    ap.add_argument("--epochs", type=int, default=0, help="0 = the cpu-demo profile's")
    ap.add_argument("--img-size", type=int, default=0, help="0 = the cpu-demo profile's")
    ap.add_argument("--seeds", default="0,1,2", help="bag member seeds")
    ap.add_argument("--noise", type=float, default=0.10, help="share of train labels flipped")
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()

    from pipeline.core.io import read_csv, write_csv
    from pipeline.stages.label_exclusions import FIELDS as EXCLUSION_FIELDS
    from pipeline.stages.label_exclusions import exclusion_rows
    from pipeline.stages.label_issues import run_label_issues
    from pipeline.stages.split import run_split
    from pipeline.stages.validate import VALIDATED_FIELDS, run_validate

    seeds = [int(s) for s in args.seeds.split(",")]
    cfg, params = build_config(args.epochs, args.img_size, seeds, args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    raw, cache = out / "raw", out / "cache"
    data = out / "data"
    n = lay_out_elpv(raw, data / "manifest.csv", args.limit_per_class)
    _say(f"ELPV laid out: {n} images", t0)
    report = run_validate(
        cfg,
        raw,
        data / "manifest.csv",
        data / "ingest_rejects.csv",
        data / "validated.csv",
        data / "quarantine.csv",
        data / "validation.json",
    )
    _say(f"validate: {report['validated']} validated, {report['quarantined']} quarantined", t0)
    validated = read_csv(data / "validated.csv")

    runs = {k: out / k for k in ("a_noisy", "b_noisy_minus_flagged", "c_clean")}
    for w in runs.values():
        w.mkdir(parents=True, exist_ok=True)
    run_split(cfg, data / "validated.csv", runs["c_clean"] / "split.csv", runs["c_clean"] / "split.json")
    clean_split = read_csv(runs["c_clean"] / "split.csv")
    noisy, flips = flip_train_labels(validated, clean_split, args.noise, args.noise_seed)
    write_csv(data / "validated_noisy.csv", noisy, VALIDATED_FIELDS)
    write_csv(
        data / "flips.csv",
        [{"path": p, "true_class": t, "noisy_class": f} for p, (t, f) in sorted(flips.items())],
        ["path", "true_class", "noisy_class"],
    )
    run_split(cfg, data / "validated_noisy.csv", runs["a_noisy"] / "split.csv", runs["a_noisy"] / "split.json")
    noisy_split = read_csv(runs["a_noisy"] / "split.csv")
    if held_out(noisy_split) != held_out(clean_split):
        raise SystemExit("the noisy split's val/test differ from the clean split's: the comparison would not be fair")
    n_train = sum(r["split"] == "train" for r in clean_split)
    _say(f"split: {n_train} train images, {len(flips)} flipped ({args.noise:.0%}); val/test identical", t0)

    results: dict = {
        "recipe": {
            "profile": "cpu-demo",
            "backbone": cfg.model.backbone,
            "weights": cfg.model.weights,
            "freeze": cfg.model.freeze,
            "img_size": cfg.model.img_size,
            "epochs": cfg.train.epochs,
            "bag_seeds": list(cfg.bag.seeds),
            "bootstrap": cfg.bag.bootstrap,
            "folds": cfg.bag.folds,
            "images": n,
            "noise": args.noise,
            "noise_seed": args.noise_seed,
            "filter_by": cfg.label_issues.filter_by,
        },
        "command": "python -m bench.label_noise " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }

    a = train_and_evaluate(cfg, "(a) noisy", runs["a_noisy"] / "split.csv", raw, runs["a_noisy"], cache, t0)
    summary = run_label_issues(
        cfg,
        runs["a_noisy"] / "split.csv",
        raw,
        runs["a_noisy"] / "models",
        runs["a_noisy"] / "reports" / "label_issues.csv",
        runs["a_noisy"] / "reports" / "label_issues.json",
        runs["a_noisy"] / "reports" / "label_issues.png",
        cache,
    )
    issues = read_csv(runs["a_noisy"] / "reports" / "label_issues.csv")
    flagged = {r["path"] for r in issues if r["issue"] == "True"}
    scored = {r["path"] for r in issues if r["rank"] != ""}
    hit = flagged & set(flips)
    finder = {
        "flagged": len(flagged),
        "flagged_train": sum(1 for r in issues if r["issue"] == "True" and r["split"] == "train"),
        "flipped": len(flips),
        "flipped_scored": len(set(flips) & scored),
        "true_positives": len(hit),
        "precision": len(hit) / len(flagged) if flagged else 0.0,
        "recall": len(hit) / len(flips) if flips else 0.0,
        "recall_of_scored": len(hit) / len(set(flips) & scored) if set(flips) & scored else 0.0,
        "n_scored": summary["n_scored"],
        "n_unscored": summary["n_unscored"],
    }
    _say(
        f"label_issues: {finder['flagged']} flagged, precision {finder['precision']:.3f}, "
        f"recall {finder['recall']:.3f} ({finder['true_positives']} of {len(flips)} flips)",
        t0,
    )

    # Other cleanlab rules on the same out-of-sample probabilities (no retraining): how precision trades for recall.
    import dataclasses

    rules = {}
    for rule in ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"):
        rcfg = dataclasses.replace(cfg, label_issues=dataclasses.replace(cfg.label_issues, filter_by=rule))
        rdir = runs["a_noisy"] / "rules" / rule
        run_label_issues(
            rcfg,
            runs["a_noisy"] / "split.csv",
            raw,
            runs["a_noisy"] / "models",
            rdir / "label_issues.csv",
            rdir / "label_issues.json",
            rdir / "label_issues.png",
            cache,
        )
        rflagged = {r["path"] for r in read_csv(rdir / "label_issues.csv") if r["issue"] == "True"}
        rhit = rflagged & set(flips)
        rules[rule] = {
            "flagged": len(rflagged),
            "true_positives": len(rhit),
            "precision": len(rhit) / len(rflagged) if rflagged else 0.0,
            "recall": len(rhit) / len(flips) if flips else 0.0,
        }
        _say(
            f"rule {rule}: {len(rflagged)} flagged, precision {rules[rule]['precision']:.3f}, "
            f"recall {rules[rule]['recall']:.3f}",
            t0,
        )
    results["rules"] = rules

    excl = exclusion_rows(issues, noisy_split, "bench-a", "bench-a")
    write_csv(data / "label_exclusions.csv", excl, EXCLUSION_FIELDS)
    split_b = run_split(
        cfg,
        data / "validated_noisy.csv",
        runs["b_noisy_minus_flagged"] / "split.csv",
        runs["b_noisy_minus_flagged"] / "split.json",
        data / "label_exclusions.csv",
    )
    b_held = held_out(read_csv(runs["b_noisy_minus_flagged"] / "split.csv"))
    if {k for k in b_held if k[2] == "test"} != {k for k in held_out(clean_split) if k[2] == "test"}:
        raise SystemExit("the exclusion run's test split differs from the clean split's")
    _say(f"split with exclusions: {split_b['excluded']}", t0)
    b = train_and_evaluate(
        cfg,
        "(b) noisy minus flagged",
        runs["b_noisy_minus_flagged"] / "split.csv",
        raw,
        runs["b_noisy_minus_flagged"],
        cache,
        t0,
    )
    c = train_and_evaluate(cfg, "(c) clean", runs["c_clean"] / "split.csv", raw, runs["c_clean"], cache, t0)

    fa, fb, fc = a["weighted_f1"], b["weighted_f1"], c["weighted_f1"]
    results.update(
        {
            "finder": finder,
            "excluded": split_b["excluded"],
            "weighted_f1": {"a_noisy": fa, "b_noisy_minus_flagged": fb, "c_clean": fc},
            "macro_f1": {"a_noisy": a["macro_f1"], "b_noisy_minus_flagged": b["macro_f1"], "c_clean": c["macro_f1"]},
            "n_test": a["n_test"],
            "gap_recovered": (fb - fa) / (fc - fa) if fc != fa else None,
            "wall_seconds": round(time.time() - t0, 1),
        }
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(
        f"| finder precision | {finder['precision']:.3f} |\n| finder recall | {finder['recall']:.3f} |\n"
        f"| flagged | {finder['flagged']} |\n| (a) noisy wF1 | {fa:.4f} |\n| (b) noisy - flagged wF1 | {fb:.4f} |\n"
        f"| (c) clean wF1 | {fc:.4f} |\n| gap recovered | {results['gap_recovered']} |\n"
        f"| wall | {results['wall_seconds']:.0f} s |"
    )
    print(f"results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    sys.exit(main())
