"""Stage ``label_issues``: rank train/val photos by how likely their label is wrong (cleanlab, confident learning).

    python -m pipeline label_issues --params params.yaml --split data/split.csv --raw-dir data/raw \
        --models-dir models --issues reports/label_issues.csv --metrics reports/label_issues.json \
        --grid reports/label_issues.png

cleanlab needs out-of-sample probabilities. The bag gives them (``pipeline.core.oob``): a train image is scored by
the mean of the members whose bootstrap resample left it (and its near-duplicates) out; a val image by every member.
A train image in every member's resample stays unscored (counted, source ``unscored:in_every_member``): we never
pass in-sample probabilities to cleanlab. Outputs:

* ``label_issues.csv`` — every train/val image: rank (1 = least likely correct; empty when unscored), path, split,
  given class, suggested class (argmax of its out-of-sample probabilities), label-quality score
  (``label_issues.ranked_by``), whether cleanlab flags it (``label_issues.filter_by``), the probability source;
* ``label_issues.json`` — counts (a DVC metrics file: escaped JSON);
* ``label_issues.png`` — the top flagged images of each given class, captioned "given ⇒ suggested".

Nothing is moved or deleted: the report is for people (and, later, the relabelling loop) to act on.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core.config import Config
from pipeline.core.data import build_cache, load_split
from pipeline.core.devices import resolve_device
from pipeline.core.figures import ARROW, plot_label_issue_grid
from pipeline.core.images import decode_rgb, resize_uint8
from pipeline.core.inference import BagPredictor
from pipeline.core.io import read_csv, write_csv, write_json
from pipeline.core.oob import SOURCE_UNSCORED, SOURCE_VAL, in_bag_matrix, out_of_bag_probs, train_sources
from pipeline.stages.paths import member_dirs

_logger = logging.getLogger(__name__)
FIELDS = ["rank", "path", "split", "given_class", "suggested_class", "label_quality", "issue", "p_given", "source"]
THUMB = 96  # thumbnail side in the grid, pixels


def find_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str, ranked_by: str) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's label-quality score (low = likely mislabelled) and issue flag for each row of ``probs``.

    ``probs`` must be out-of-sample. Classes absent from ``labels`` are fine (their columns stay in ``probs``).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if len(labels) == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    quality = get_label_quality_scores(labels, probs, method=ranked_by)
    flagged = find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)  # n_jobs=1: same result every run
    return np.asarray(quality, dtype=float), np.asarray(flagged, dtype=bool)


def member_probabilities(
    dirs: list[Path],
    device,
    raw_dir: Path,
    paths: list[str],
    shas: list[str],
    cache_dir: Path | None,
    rows: list[np.ndarray] | None = None,
) -> tuple[list[str], list[np.ndarray]]:
    """Each member's own probabilities on the given images (class names, one N×K array per member).

    With ``rows`` (one index array per member) a member computes only those images, e.g. the ones it never
    trained on; its other rows stay 0 (weight 0 in :func:`pipeline.core.oob.out_of_bag_probs`). With fold
    members that is a third of the work of scoring every image with every member.
    """
    bag = BagPredictor.from_dirs(dirs, device)
    arrays = {s: build_cache(raw_dir, paths, shas, s, cache_dir) for s in bag.sizes()}
    feature_dir = cache_dir.parent / "features" if cache_dir is not None else None  # the train stage's cache
    if rows is None:
        return bag.class_names, bag.member_proba_arrays(arrays, shas=shas, feature_dir=feature_dir)
    out = []
    for member, idx in zip(bag.members, rows):
        probs = np.zeros((len(paths), len(bag.class_names)), dtype=np.float32)
        if len(idx):
            probs[idx] = BagPredictor([member]).member_proba_arrays(
                {s: a[idx] for s, a in arrays.items()}, shas=[shas[i] for i in idx], feature_dir=feature_dir
            )[0]
        out.append(probs)
    return bag.class_names, out


def rank_rows(records: list[dict]) -> list[dict]:
    """Scored rows by label quality (ascending, path breaks ties) with rank 1..n, then the unscored ones."""
    scored = sorted((r for r in records if r["label_quality"] != ""), key=lambda r: (r["label_quality"], r["path"]))
    unscored = sorted((r for r in records if r["label_quality"] == ""), key=lambda r: r["path"])
    for i, r in enumerate(scored, 1):
        r["rank"] = i
    return scored + unscored


def build_report(
    paths: list[str],
    splits: list[str],
    labels: np.ndarray,
    probs: np.ndarray,
    sources: list[str],
    class_names: list[str],
    filter_by: str,
    ranked_by: str,
) -> list[dict]:
    """One row per image; NaN rows of ``probs`` are the unscored images (they never reach cleanlab)."""
    scored = ~np.isnan(probs).any(axis=1)
    quality, flagged = find_issues(labels[scored], probs[scored], filter_by, ranked_by)
    q = np.full(len(paths), np.nan)
    q[scored] = quality
    f = np.zeros(len(paths), dtype=bool)
    f[scored] = flagged
    records = []
    for i, path in enumerate(paths):
        ok = bool(scored[i])
        records.append(
            {
                "rank": "",
                "path": path,
                "split": splits[i],
                "given_class": class_names[labels[i]],
                "suggested_class": class_names[int(probs[i].argmax())] if ok else "",
                "label_quality": round(float(q[i]), 6) if ok else "",
                "issue": bool(f[i]),
                "p_given": round(float(probs[i, labels[i]]), 6) if ok else "",
                "source": sources[i],
            }
        )
    return rank_rows(records)


def summarise(rows: list[dict], cfg: Config) -> dict:
    """The counts of ``label_issues.json`` (and of the model card)."""
    scored = [r for r in rows if r["rank"] != ""]
    flagged = [r for r in scored if r["issue"]]
    kinds = Counter("unscored" if r["source"] == SOURCE_UNSCORED else r["source"].split(":")[0] for r in rows)
    return {
        "n_images": len(rows),
        "n_scored": len(scored),
        "n_unscored": kinds.get("unscored", 0),
        "n_flagged": len(flagged),
        "flagged_share": round(len(flagged) / len(scored), 6) if scored else 0.0,
        "by_source": {"oob": kinds.get("oob", 0), "val": kinds.get("val", 0), "unscored": kinds.get("unscored", 0)},
        "flagged_per_class": dict(sorted(Counter(r["given_class"] for r in flagged).items())),
        "filter_by": cfg.label_issues.filter_by,
        "ranked_by": cfg.label_issues.ranked_by,
        "members": [f"member_{s}" for s in cfg.bag.seeds],
        "bootstrap": cfg.bag.bootstrap,
        "folds": cfg.bag.folds,
    }


def draw_grid(rows: list[dict], raw_dir: Path, per_class: int, summary: dict, png_fp: Path) -> None:
    suspects: dict[str, list] = {}
    for r in rows:  # already in rank order
        items = suspects.setdefault(r["given_class"], [])
        if r["issue"] and len(items) < per_class:
            thumb = resize_uint8(decode_rgb(str(raw_dir / r["path"])), THUMB)
            items.append(
                (thumb, f"{r['given_class']} {ARROW} {r['suggested_class']}\n#{r['rank']}  q={r['label_quality']:.3f}")
            )
    title = (
        f"label issues: {summary['n_flagged']} flagged of {summary['n_scored']} scored images "
        f"({summary['n_unscored']} unscored: in every member's resample)"
    )
    plot_label_issue_grid(dict(sorted(suspects.items())), title, png_fp)


def run_label_issues(
    cfg: Config,
    split_fp: Path,
    raw_dir: Path,
    models_dir: Path,
    issues_fp: Path,
    metrics_fp: Path,
    grid_fp: Path,
    cache_dir: Path | None = None,
) -> dict:
    device = resolve_device(cfg.train.device, "train.device")
    split = load_split(split_fp)
    # duplicate groups of the train images, in load_split's order (a split file without groups: one image each)
    groups = [r.get("group") or r["path"] for r in read_csv(split_fp) if r["split"] == "train"]
    dirs = member_dirs(cfg.bag.seeds, models_dir)
    names = [d.name for d in dirs]
    seen = in_bag_matrix(split.labels["train"], cfg.bag.seeds, cfg.bag.bootstrap, groups, cfg.bag.folds)
    class_names, train_probs = member_probabilities(
        dirs,
        device,
        raw_dir,
        split.paths["train"],
        split.sha256["train"],
        cache_dir,
        rows=[np.flatnonzero(~seen[:, m]) for m in range(seen.shape[1])],  # each member: what it never saw
    )
    if tuple(class_names) != split.class_names:
        raise ValueError(f"the bag was trained on other classes than {split_fp} holds; rerun the train stages")
    probs = [out_of_bag_probs(train_probs, seen)]
    sources = train_sources(seen, names)
    if split.labels["val"]:
        _, val_probs = member_probabilities(dirs, device, raw_dir, split.paths["val"], split.sha256["val"], cache_dir)
        probs.append(np.mean(val_probs, axis=0))
        sources += [SOURCE_VAL] * len(split.labels["val"])
    rows = build_report(
        split.paths["train"] + split.paths["val"],
        ["train"] * len(split.paths["train"]) + ["val"] * len(split.paths["val"]),
        np.asarray(split.labels["train"] + split.labels["val"], dtype=int),
        np.concatenate(probs),
        sources,
        class_names,
        cfg.label_issues.filter_by,
        cfg.label_issues.ranked_by,
    )
    summary = summarise(rows, cfg)
    write_csv(issues_fp, rows, FIELDS)
    write_json(metrics_fp, summary)  # DVC metrics: escaped JSON, whatever the class names
    draw_grid(rows, raw_dir, cfg.label_issues.grid_per_class, summary, grid_fp)
    _logger.info(
        "label_issues: %d of %d scored images flagged; %d unscored (in every member's resample)",
        summary["n_flagged"],
        summary["n_scored"],
        summary["n_unscored"],
    )
    return summary
