"""The model card: a registered version's description (gate, data, metrics, calibration, label issues, model),
built from the register stage's inputs. Pure text; the register stage writes it to MLflow."""

from __future__ import annotations

import platform
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.gate import GATE_RULE, GateDecision
from pipeline.core.gate_stats import CI_LEVEL
from pipeline.stages import paths

COMPARISON_PNG = Path("gate/comparison.png")  # run artifact paths an auditor opens
RELIABILITY_PNG = Path("calibration/reliability.png")


def model_card(
    cfg: Config,
    version: str,
    metrics: dict,
    per_class: list[dict],
    counts: dict,
    lineage: dict,
    decision: str,
    reason: str,
    members: list[dict],
    backbones: dict | None = None,
    extra: list[str] | None = None,
) -> str:
    """The version's description: gate, data, metrics, ``extra`` sections (gate details, calibration), model."""
    backbones = backbones or {}
    lines = [
        f"# {cfg.registry.model_name} v{version}",
        "",
        f"**Gate:** {decision} — {reason}",
        "",
        *(extra or []),
        "## Data",
        f"- landing: `{cfg.data.landing_uri}`",
        *(f"- {k}: `{v}`" for k, v in lineage.items()),
        "- class counts (validated): " + ", ".join(f"{c} {n}" for c, n in counts.items()),
        "",
        "## Test metrics (held-out split, `evaluate`)",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)),
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        *(
            f"| {r['class_name']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
            for r in per_class
        ),
        *(
            [
                "",
                "## Backbones (each transfer-trained once, same test split)",
                "| backbone | weighted F1 | macro F1 | accuracy |",
                "|---|---|---|---|",
                *(
                    f"| {b} | {m['weighted_f1']:.4f} | {m['macro_f1']:.4f} | {m['accuracy']:.4f} |"
                    for b, m in backbones.items()
                ),
            ]
            if backbones
            else []
        ),
        "",
        "## Model",
        f"- bag of {len(members)} × `{cfg.model.backbone}` @ {cfg.model.img_size}px, weights "
        f"{members[0]['weights_source']}, freeze `{cfg.model.freeze}`",
        f"- epochs {cfg.train.epochs}, batch {cfg.train.batch_size}, lr {cfg.train.lr}, focal gamma "
        f"{cfg.train.focal_gamma}, label smoothing {cfg.train.label_smoothing}, CutMix p "
        f"{cfg.train.cutmix_prob}, sampler power {cfg.train.sampler_power}",
        f"- members' data: {_member_data(cfg)}; symmetries in training `{cfg.train.flip_default}` "
        f"(per-class policy where set); frozen layers "
        f"{'computed once and cached' if any(m.get('cache_frozen') for m in members) else 'run every epoch'}",
        f"- prediction averages over {len(members[0].get('tta_variants') or [0])} view(s) per member "
        f"(model.tta {str(cfg.model.tta).lower()}; the pyfunc's param `tta` turns it off)",
        f"- trained on {members[0]['device']} ({platform.machine()}, {platform.node()}), "
        f"{sum(m['train_seconds'] for m in members):.0f} s in all; profile `{cfg.profile}`",
    ]
    return "\n".join(lines) + "\n"


def _member_data(cfg: Config) -> str:
    k = len(cfg.bag.seeds)
    if cfg.bag.folds and k > 1:
        return f"{k} folds, member k leaves out fold k (bag.folds)"
    return "a stratified bootstrap resample each (bag.bootstrap)" if cfg.bag.bootstrap else "all train images"


def gate_card(decision: GateDecision, champion_version: str | None, confidence: float) -> list[str]:
    """The model card's gate section: what was compared, how, and the numbers."""
    lines = [
        "## Gate: candidate against champion",
        "",
        f"Both scored by their registered pyfuncs on the same {decision.n_test} test images "
        "(same decode and resize; each with its registered TTA views). Rule: " + GATE_RULE + ".",
        "",
        "| | value |",
        "|---|---|",
        f"| candidate weighted F1 (its pyfunc) | {decision.candidate_f1:.4f} |",
    ]
    s = decision.stats
    if s is None:
        lines.append("| champion | none: a first champion needs only the floor |")
    else:
        lines += [
            f"| champion v{champion_version} weighted F1 (re-scored now) | {decision.champion_f1:.4f} |",
            f"| ΔwF1 = candidate − champion | {s.delta:+.4f} |",
            f"| {CI_LEVEL:.0%} bootstrap interval of ΔwF1 | [{s.ci_low:+.4f}, {s.ci_high:+.4f}] |",
            f"| P(ΔwF1 > {s.min_delta:g}) | {s.p_improve:.4f} (promote at ≥ {confidence:g}) |",
            f"| resamples | {s.resamples} |",
        ]
    lines += [
        f"| test images n | {decision.n_test} |",
        "",
        f"Per-class F1 and both confusion matrices: run artifact `{COMPARISON_PNG}`.",
        "",
    ]
    return lines


def calibration_card(calibration: dict) -> list[str]:
    """The model card's calibration section (what ``confidence`` means), from ``calibration.json``."""
    if not calibration:
        return []
    ece = [
        f"{split} {calibration[f'ece_{split}_before']:.4f} → {calibration[f'ece_{split}_after']:.4f}"
        for split in ("val", "test")
        if calibration.get(f"ece_{split}_before") is not None
    ]
    fitted = (
        calibration["note"]
        if "note" in calibration
        else f"fitted on {calibration['n_val']} val images (NLL of softmax(log(mean member probability) / T))"
    )
    return [
        "## Calibration",
        "",
        f"- temperature T = {calibration['temperature']:.3f}: {fitted}; served `confidence` uses it, labels "
        "do not change",
        f"- ECE ({calibration.get('bins', 15)} bins) before → after: {', '.join(ece) or 'not measured'}",
        f"- reliability diagram: run artifact `{RELIABILITY_PNG}`",
        "",
    ]


def label_issues_card(summary: dict) -> list[str]:
    """The model card's label-issue counts (``label_issues.json``; empty when that stage did not run)."""
    if not summary:
        return []
    src = summary["by_source"]
    per_class = ", ".join(f"{c} {n}" for c, n in summary["flagged_per_class"].items()) or "none"
    return [
        "## Label issues (cleanlab on out-of-sample probabilities)",
        "",
        f"- flagged: {summary['n_flagged']} of {summary['n_scored']} scored train/val images "
        f"(`{summary['filter_by']}`, ranked by `{summary['ranked_by']}`); per given class: {per_class}",
        f"- scored out-of-bag {src['oob']} train images, {src['val']} val images by every member; unscored "
        f"{summary['n_unscored']} train images that every member trained on",
        f"- every image ranked: run artifact `reports/{paths.LABEL_ISSUES.name}`; top suspects' thumbnails: "
        f"`reports/{paths.LABEL_ISSUES_GRID.name}`. Nothing was relabelled; what left this training is under "
        '"Label exclusions".',
        "",
    ]


def exclusions_card(enabled: bool, excluded: dict, model_name: str) -> list[str]:
    """The model card's ``data.exclude_label_issues`` section, from ``split.json``'s ``excluded`` counts."""
    if not enabled:
        return ["## Label exclusions", "", "- `data.exclude_label_issues` is false: no image was excluded.", ""]
    versions = excluded.get("source_versions") or []
    if not excluded.get("listed"):
        return [
            "## Label exclusions",
            "",
            "- `data.exclude_label_issues` is true, but no image was excluded: "
            f"{model_name} had no champion (or its report flagged none) when this run split its data.",
            "",
        ]
    n = excluded["dropped_train"] + excluded["dropped_val"]
    return [
        "## Label exclusions",
        "",
        f"- `data.exclude_label_issues` is true: {n} images left this training ({excluded['dropped_train']} "
        f"train, {excluded['dropped_val']} val), flagged by the label-issue report of {model_name} "
        f"v{', v'.join(versions)} (the champion when this run split its data)",
        f"- {excluded['listed']} listed in `{paths.LABEL_EXCLUSIONS}` (its md5 is in the lineage's dvc.lock); "
        f"{excluded['kept_in_test']} kept because they are test images, {excluded['not_matched']} no longer in "
        "the data under the same path and content (moved, relabelled or changed: they trained again)",
        "- nothing was deleted: the images stay in the bucket and in `data/raw`",
        "",
    ]
