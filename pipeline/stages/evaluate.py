"""Stage ``evaluate``: score each backbone, each bag member and the bag on the held-out test split.

    python -m pipeline evaluate --params params.yaml --split data/split.csv --raw-dir data/raw \
        --models-dir models --metrics metrics/eval.json --reports-dir reports/eval

The test split is never seen by training or early stopping. Writes weighted F1 (the competition
metric), macro F1 and accuracy as DVC metrics, per-class precision/recall/F1, the confusion
matrix as JSON/CSV (for ``dvc plots``) and PNG (for MLflow).

Calibration: the bag's temperature is fitted on the validation split (``pipeline.core.calibration``), with ECE
(15 bins) before and after on val and, held out, on test; ``calibration.json`` (shipped with the registered
model, so its ``confidence`` is calibrated) and a reliability diagram ``reliability.png``. Labels, and so every
F1 here, do not depend on it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from pipeline.core.calibration import calibrate
from pipeline.core.config import Config
from pipeline.core.data import SplitData, build_cache, load_split
from pipeline.core.devices import resolve_device
from pipeline.core.figures import plot_confusion, plot_reliability
from pipeline.core.inference import BagPredictor
from pipeline.core.io import write_json, write_text_atomic
from pipeline.stages.paths import backbone_dirs, member_dirs

_logger = logging.getLogger(__name__)
# What metrics/eval.json keeps of calibration.json (the bins stay in the report).
CALIBRATION_METRICS = ("temperature", "ece_val_before", "ece_val_after", "ece_test_before", "ece_test_after")


def score(y_true: list[int], y_pred: list[int] | np.ndarray) -> dict[str, float]:
    return {
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def split_arrays(
    raw_dir: Path, split: SplitData, which: str, sizes: set[int], cache_dir: Path | None
) -> tuple[dict, list[int]]:
    """One split's decoded images per input size (from the shared image cache) and its labels."""
    arrays = {s: build_cache(raw_dir, split.paths[which], split.sha256[which], s, cache_dir) for s in sizes}
    return arrays, split.labels[which]


def calibrate_bag(
    bag: BagPredictor,
    raw_dir: Path,
    split: SplitData,
    test_probs: np.ndarray,
    y_test: list[int],
    cache_dir: Path | None,
    reports_dir: Path,
) -> tuple[dict, dict]:
    """Fit the bag's temperature on val; write calibration.json and reliability.png.

    Returns the calibration summary and the bag's scores on val (the split recipes are chosen on; empty when
    there is no val split)."""
    val_arrays, y_val = split_arrays(raw_dir, split, "val", bag.sizes(), cache_dir)
    n_classes = len(bag.class_names)
    val_probs = bag.predict_proba_arrays(val_arrays) if y_val else np.zeros((0, n_classes))
    cal = calibrate(val_probs, y_val, test_probs, y_test)
    write_json(reports_dir / "calibration.json", cal)
    where = {"val": ", T not fitted: too few" if "note" in cal else ", T fitted here", "test": ", held out"}
    panels = {
        f"{name} ({cal[f'n_{name}']} images{where[name]})": {
            "before": cal[f"reliability_{name}"]["before"],
            "after": cal[f"reliability_{name}"]["after"],
            "ece_before": cal[f"ece_{name}_before"],
            "ece_after": cal[f"ece_{name}_after"],
        }
        for name in ("val", "test")
        if cal.get(f"n_{name}")
    }
    if panels:
        plot_reliability(panels, cal["temperature"], reports_dir / "reliability.png")
    summary = {k: cal.get(k) for k in CALIBRATION_METRICS}  # None: that split is empty
    _logger.info(
        "evaluate: temperature %.3f fitted on %d val images; ECE before -> after: %s",
        cal["temperature"],
        len(y_val),
        ", ".join(
            f"{split} {cal[f'ece_{split}_before']:.4f} -> {cal[f'ece_{split}_after']:.4f}"
            for split in ("val", "test")
            if f"ece_{split}_before" in cal
        )
        or "none",
    )
    return summary, (score(y_val, val_probs.argmax(1)) if y_val else {})


def run_evaluate(
    cfg: Config,
    split_fp: Path,
    raw_dir: Path,
    models_dir: Path,
    metrics_fp: Path,
    reports_dir: Path,
    cache_dir: Path | None = None,
) -> dict:
    device = resolve_device(cfg.train.device, "train.device")
    _logger.info("evaluate: scoring on %s", device)
    bag = BagPredictor.from_dirs(member_dirs(cfg.bag.seeds, models_dir), device)
    singles = {
        name: BagPredictor.from_dirs([d], device) for name, d in backbone_dirs(cfg.backbones, models_dir).items()
    }
    sizes = bag.sizes().union(*(b.sizes() for b in singles.values()))
    split = load_split(split_fp)
    arrays, y_true = split_arrays(raw_dir, split, "test", sizes, cache_dir)
    if not y_true:
        raise ValueError(f"the test split in {split_fp} is empty; add data or lower split.min_class_for_split")
    member_probs = bag.member_proba_arrays(arrays)  # one pass: members share their frozen layers' output
    members = {f"member_{seed}": score(y_true, p.argmax(1)) for seed, p in zip(cfg.bag.seeds, member_probs)}
    labels = list(range(len(bag.class_names)))
    backbones, backbone_reports = {}, {}
    for name, single in singles.items():
        if single.class_names != bag.class_names:
            raise ValueError(f"backbone {name} was trained on other classes than the bag; rerun its stage")
        pred = single.predict_proba_arrays(arrays).argmax(1)
        backbones[name] = score(y_true, pred)
        f = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)[2]
        backbone_reports[name] = {
            **backbones[name],
            "img_size": single.members[0].meta["img_size"],
            "weights_source": single.members[0].meta["weights_source"],
            "train_seconds": single.members[0].meta["train_seconds"],
            "per_class_f1": {c: float(f[i]) for i, c in enumerate(bag.class_names)},
            "confusion": confusion_matrix(y_true, pred, labels=labels).tolist(),
        }
    probs = np.mean(member_probs, axis=0)  # = bag.predict_proba_arrays(arrays)
    y_pred = probs.argmax(1)
    reports_dir.mkdir(parents=True, exist_ok=True)
    calibration, val_scores = calibrate_bag(bag, raw_dir, split, probs, y_true, cache_dir, reports_dir)
    metrics = {
        **score(y_true, y_pred),
        "n_test": len(y_true),
        "val": {**val_scores, "n_val": len(split.labels["val"])},
        "members": members,
        "backbones": backbones,
        "calibration": calibration,
    }
    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = [
        {"class_name": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
        for i, c in enumerate(bag.class_names)
    ]
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    write_json(metrics_fp, metrics)  # a DVC metrics file: escaped JSON, whatever names it holds
    write_text_atomic(reports_dir / "per_class.json", json.dumps(per_class, indent=2, ensure_ascii=False) + "\n")
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["actual", "predicted"])  # dvc plots confusion-matrix input
    writer.writerows((bag.class_names[t], bag.class_names[q]) for t, q in zip(y_true, y_pred))
    write_text_atomic(reports_dir / "predictions.csv", buf.getvalue())
    write_text_atomic(
        reports_dir / "confusion.json",
        json.dumps({"labels": bag.class_names, "matrix": cm.tolist()}, ensure_ascii=False) + "\n",
    )
    plot_confusion(cm, bag.class_names, reports_dir / "confusion.png")
    write_text_atomic(reports_dir / "backbones.json", json.dumps(backbone_reports, indent=2, ensure_ascii=False) + "\n")
    for name, b in backbones.items():
        _logger.info("evaluate: backbone %s weighted F1 %.4f, macro F1 %.4f", name, b["weighted_f1"], b["macro_f1"])
    _logger.info(
        "evaluate: bag weighted F1 %.4f, macro F1 %.4f on %d test images",
        metrics["weighted_f1"],
        metrics["macro_f1"],
        len(y_true),
    )
    return metrics
