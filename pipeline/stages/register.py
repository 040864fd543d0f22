"""Stage ``register``: log the run, register the bag, gate it against the champion, set aliases.

    python -m pipeline register --params params.yaml --split data/split.csv --raw-dir data/raw \
        --models-dir models --metrics metrics/eval.json --reports-dir reports --decision registry/decision.json

Gate (docs/decisions/0004-the-gate.md): candidate and champion are scored by one code path, each through its
own registered pyfunc, on one frame of today's test split. Promote only if the candidate's weighted F1 >=
``registry.f1_floor`` and, when there is a champion, a paired bootstrap over the test images gives
P(ΔwF1 > ``registry.min_delta``) >= ``registry.confidence``. The interval, the probability and n go into the
version's tags and model card, the comparison picture into the run's artifacts. A registry error while reading
the champion fails the stage (transient, retried): it never means "no champion". A rejected candidate stays
registered with alias ``challenger``. Re-running for the same model files creates no second version (versions
carry a ``candidate_id`` tag = hash of the member files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from pipeline.adapters import tracking, workspace
from pipeline.core import checkpoints, settings
from pipeline.core.config import Config
from pipeline.core.devices import resolve_device
from pipeline.core.figures import plot_gate_comparison
from pipeline.core.gate import GateDecision, gate, gate_tags
from pipeline.core.gate_stats import CI_LEVEL
from pipeline.core.io import read_csv, text_sha256, write_text_atomic
from pipeline.stages import paths
from pipeline.stages.model_card import (
    COMPARISON_PNG,
    RELIABILITY_PNG,
    calibration_card,
    exclusions_card,
    gate_card,
    label_issues_card,
    model_card,
)
from pipeline.stages.paths import backbone_dirs, member_dirs

_logger = logging.getLogger(__name__)
PARITY_WARN = 1e-6  # |package wF1 - evaluate wF1| above this is logged: the two scoring paths disagree


def candidate_id(dirs: list[Path], metrics_fp: Path) -> str:
    """Hash of what the bag computes: member weights (tensor bytes), classes, input size and test metrics.

    Timing and host details in meta.json are left out, so retraining to identical weights is no new candidate.
    """
    import torch

    h = hashlib.sha256()
    for d in dirs:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        state = checkpoints.load(d / "model.pt", "model weights", meta.get("model_sha256"))
        for key in sorted(state):
            h.update(key.encode())
            h.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps([meta["backbone"], meta["img_size"], meta["class_names"]], ensure_ascii=False).encode())
    h.update(metrics_fp.read_bytes())
    return h.hexdigest()


def test_frame(split_fp: Path, raw_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """The test split as the pyfunc's input (base64 images) plus true class names."""
    from pipeline.adapters.serving import encode_image_file

    rows = [r for r in read_csv(split_fp) if r["split"] == "test"]
    frame = pd.DataFrame({"image": [encode_image_file(raw_dir / r["path"]) for r in rows]})
    return frame, [r["class_name"] for r in rows]


def score_version(name: str, version: str, frame: pd.DataFrame, device_choice: str = "auto") -> list[str]:
    """Labels of registered version ``version`` on ``frame``: its own files, loaded from the registry.

    Candidate and champion go through this one function (same decode and resize as the pyfunc's ``predict``;
    each with its own TTA views, as it serves), so a difference in preprocessing between two code paths cannot
    bias the gate, and a package whose members do not load or predict is caught before it can be promoted. The
    bag is rebuilt from its weights and meta files (``tracking.load_bag``), never unpickled: the champion alias
    is movable by engineers, and this stage runs as the service account. Both run on ``train.device``
    (``device_choice``), where evaluate scored: on a GPU as they trained (bf16), on a CPU fp32.
    """
    from pipeline.adapters.serving import predict_frame

    predictor = tracking.load_bag(f"models:/{name}/{version}", resolve_device(device_choice, "train.device"))
    return [str(x) for x in predict_frame(predictor, frame)["label"].tolist()]


def draw_comparison(truth: list[str], predictions: dict[str, list[str]], decision: GateDecision, png_fp: Path) -> None:
    """The gate's picture: per-class F1 of each model side by side and both confusion matrices."""
    names = sorted({*truth, *(x for labels in predictions.values() for x in labels)} - {""})
    f1 = {
        who: precision_recall_fscore_support(truth, pred, labels=names, zero_division=0)[2].tolist()
        for who, pred in predictions.items()
    }
    confusion = {who: confusion_matrix(truth, pred, labels=names) for who, pred in predictions.items()}
    s = decision.stats
    title = (
        f"{decision.label}: no champion yet, weighted F1 {decision.candidate_f1:.4f} on {decision.n_test} test images"
        if s is None
        else f"{decision.label}: ΔwF1 = candidate - champion = {s.delta:+.4f}, {CI_LEVEL:.0%} CI [{s.ci_low:+.4f}, "
        f"{s.ci_high:+.4f}], P(ΔwF1 > {s.min_delta:g}) = {s.p_improve:.4f}, n = {s.n} test images"
    )
    plot_gate_comparison(names, f1, confusion, title, png_fp)


def run_register(
    cfg: Config,
    split_fp: Path,
    raw_dir: Path,
    models_dir: Path,
    metrics_fp: Path,
    reports_dir: Path,
    decision_fp: Path,
    lock_fp: Path = Path("dvc.lock"),
    params_fp: Path = paths.PARAMS,
) -> dict:
    dirs = member_dirs(cfg.bag.seeds, models_dir)
    cid = candidate_id(dirs, metrics_fp)
    metrics = json.loads(metrics_fp.read_text())
    name = cfg.registry.model_name
    client = tracking.connect(cfg.registry.experiment)
    existing = tracking.version_by_candidate(client, name, cid)
    if existing is not None and existing.tags.get("gate"):
        _logger.info("version %s already holds these model files; not registering again", existing.version)
        return _write_decision(
            decision_fp,
            name,
            existing.version,
            existing.run_id,
            metrics["weighted_f1"],
            existing.tags["gate"],
            existing.tags,
        )
    validation = json.loads((reports_dir / "validation.json").read_text(encoding="utf-8"))
    stored = workspace.lineage_files(lock_fp, params_fp)
    dvc_md5s = workspace.lock_out_md5s(
        lock_fp,
        {"dvc_data_md5": ("ingest", paths.RAW_DIR.as_posix()), "dvc_split_md5": ("split", paths.SPLIT.as_posix())},
    )
    lineage = {
        "data_fingerprint": validation["fingerprint"],
        **dvc_md5s,
        "git_commit": tracking.git_commit(None),
        "params_hash": cfg.params_hash(),
        **(
            {
                "dvc_lock_sha256": text_sha256(stored["lineage/dvc.lock"]),
                "params_sha256": text_sha256(stored["lineage/params.yaml"]),
            }
            if stored
            else {}
        ),
    }
    frame, truth = test_frame(split_fp, raw_dir)
    calibration_fp = reports_dir / "eval" / "calibration.json"
    if existing is None:
        tracking.claim_model(client, name, cfg.registry.experiment)
        split_df = pd.DataFrame(read_csv(split_fp))
        run_id, version = tracking.log_candidate(
            cfg_dict=cfg.to_dict(),
            candidate_id=cid,
            metrics=metrics,
            member_dirs=dirs,
            artifact_paths=[reports_dir, split_fp, split_fp.parent / "quarantine.csv"],
            artifact_texts=stored,
            dataset_frame=split_df,
            dataset_source=cfg.data.landing_uri,
            lineage=lineage,
            input_example=frame.head(2),
            model_name=name,
            backbone_dirs=backbone_dirs(cfg.backbones, models_dir),
            # Set by the Airflow DAG (one parent run per DAG run); a workstation `dvc repro` opens its own.
            parent_run_id=settings.parent_run_id() or None,
            calibration_fp=calibration_fp,
        )
    else:  # registered by an earlier attempt that died before the gate: finish it
        run_id, version = existing.run_id, existing.version
    champion = _champion_to_beat(client, name, version)
    decision = _decide(cfg, name, version, champion, frame, truth, metrics["weighted_f1"], client, run_id)
    tracking.log_files(
        client, run_id, [calibration_fp, reports_dir / "eval" / RELIABILITY_PNG.name], str(RELIABILITY_PNG.parent)
    )
    per_class = json.loads((reports_dir / "eval" / "per_class.json").read_text(encoding="utf-8"))
    members = [json.loads((d / "meta.json").read_text(encoding="utf-8")) for d in dirs]
    calibration = metrics.get("calibration") or {}  # the summary evaluate keeps as DVC metrics
    report = json.loads(calibration_fp.read_text(encoding="utf-8")) if calibration_fp.exists() else {}
    champion_version = None if champion is None else champion.version
    issues_fp = reports_dir / paths.LABEL_ISSUES_METRICS.name  # logged with reports_dir, as are the CSV and grid
    issues = json.loads(issues_fp.read_text(encoding="utf-8")) if issues_fp.exists() else {}
    split_fp_json = reports_dir / paths.SPLIT_REPORT.name
    split_report = json.loads(split_fp_json.read_text(encoding="utf-8")) if split_fp_json.exists() else {}
    excluded = split_report.get("excluded") or {}
    card = model_card(
        cfg,
        version,
        {k: v for k, v in metrics.items() if k not in ("members", "backbones")},
        per_class,
        validation["class_counts"],
        lineage,
        decision.label,
        decision.reason,
        members,
        metrics.get("backbones"),
        extra=gate_card(decision, champion_version, cfg.registry.confidence)
        + calibration_card(report)
        + label_issues_card(issues)
        + exclusions_card(cfg.data.exclude_label_issues, excluded, name),
    )
    weights = {d.name: m["model_sha256"] for d, m in zip(dirs, members)}
    tags = {
        **lineage,
        "weights_sha256": json.dumps(weights, sort_keys=True),
        "weighted_f1": f"{metrics['weighted_f1']:.6f}",
        "macro_f1": f"{metrics['macro_f1']:.6f}",
        "per_class_f1": json.dumps({r["class_name"]: round(r["f1"], 4) for r in per_class}, ensure_ascii=False),
        "gate_reason": decision.reason,
        **gate_tags(decision, cfg.registry.confidence),
        "champion_version_at_gate": champion_version or "",
        "profile": cfg.profile,
        "label_issues_flagged": str(issues.get("n_flagged", "")),
        "label_excluded": str(excluded.get("dropped_train", 0) + excluded.get("dropped_val", 0)),
        "label_excluded_from": ",".join(excluded.get("source_versions") or []),
        **{f"calibration_{k}": "" if v is None else f"{v:.6f}" for k, v in calibration.items()},
    }
    # The decision tag goes last, with the alias switch: a version without it is unfinished and is resumed.
    client.log_text(run_id, card, "model_card.md")
    tracking.finish_version(client, name, version, tags, card, decision.promote)
    client.set_model_version_tag(name, version, "gate", decision.label)
    _logger.info("registered %s v%s: %s (%s)", name, version, decision.label, decision.reason)
    return _write_decision(decision_fp, name, version, run_id, metrics["weighted_f1"], decision.label, tags)


def _champion_to_beat(client, name: str, version: str):
    """The champion now; if an earlier attempt already made this version champion and died before tagging it,
    the one it replaced (``previous_champion``), so the retry re-takes the same decision."""
    champion = tracking.version_by_alias(client, name, "champion")  # a registry error raises: fail closed
    if champion is not None and champion.version == version:
        champion = tracking.version_by_alias(client, name, "previous_champion")
    return champion


def _decide(
    cfg: Config,
    name: str,
    version: str,
    champion,
    frame: pd.DataFrame,
    truth: list[str],
    evaluated_f1: float,
    client,
    run_id: str,
) -> GateDecision:
    """Score candidate and champion through their pyfuncs, apply the gate, log the comparison picture."""
    candidate = score_version(name, version, frame, cfg.train.device)
    predictions = {}
    if champion is not None:
        predictions[f"champion v{champion.version}"] = score_version(name, champion.version, frame, cfg.train.device)
    predictions[f"candidate v{version}"] = candidate
    champion_labels = predictions[f"champion v{champion.version}"] if champion is not None else None
    decision = gate(
        truth,
        candidate,
        champion_labels,
        cfg.registry.f1_floor,
        cfg.registry.min_delta,
        cfg.registry.confidence,
        cfg.registry.min_test_images,
    )
    if abs(decision.candidate_f1 - evaluated_f1) > PARITY_WARN:
        # Same bag, same images: only a preprocessing difference between the package and evaluate gets here.
        _logger.warning(
            "the registered package scores weighted F1 %.4f, evaluate %.4f: the two paths disagree",
            decision.candidate_f1,
            evaluated_f1,
        )
    if champion is not None:
        _logger.info(
            "champion v%s re-scored on this test split: weighted F1 %.4f", champion.version, decision.champion_f1
        )
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / COMPARISON_PNG.name
        draw_comparison(truth, predictions, decision, png)
        tracking.log_files(client, run_id, [png], str(COMPARISON_PNG.parent))
    return decision


DECISION_TAGS = (
    "gate_candidate_wf1",
    "champion_f1_rescored",
    "gate_delta_wf1",
    "gate_delta_ci_low",
    "gate_delta_ci_high",
    "gate_ci_level",
    "gate_p_improve",
    "gate_n_test",
    "gate_confidence",
)


def _write_decision(
    fp: Path, name: str, version: str, run_id: str, f1: float, decision: str, tags: dict[str, str]
) -> dict:
    """``registry/decision.json``: the outcome and the gate's numbers (from the version's tags)."""
    out = {
        "model_name": name,
        "model_version": str(version),
        "run_id": run_id,
        "weighted_f1": f1,
        "gate": decision,
        "reason": tags.get("gate_reason", ""),
        **{k: (float(tags[k]) if k != "gate_n_test" else int(tags[k])) if tags.get(k) else None for k in DECISION_TAGS},
    }
    fp.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(fp, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return out
