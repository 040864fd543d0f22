"""Stage ``register``: log the run, register the bag, gate it against the re-scored champion, set aliases.

    python -m pipeline register --params params.yaml --split data/split.csv --raw-dir data/raw \
        --models-dir models --metrics metrics/eval.json --reports-dir reports --decision registry/decision.json

Gate: promote only if the candidate's test weighted F1 >= ``registry.f1_floor`` and it beats the
current champion, re-scored now on the same test split, by >= ``registry.min_delta``. A rejected
candidate stays registered with alias ``challenger``. Re-running for the same model files creates
no second version (versions carry a ``candidate_id`` tag = hash of the member files).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

import pandas as pd
import yaml
from sklearn.metrics import f1_score

from pipeline.core import checkpoints
from pipeline.adapters import tracking
from pipeline.core.config import Config
from pipeline.stages import paths
from pipeline.stages.paths import backbone_dirs, member_dirs
from pipeline.core.io import read_csv

_logger = logging.getLogger(__name__)


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


def gate(candidate_f1: float, champion_f1: float | None, floor: float, min_delta: float) -> tuple[bool, str]:
    """The promotion rule, as a pure function."""
    if candidate_f1 < floor:
        return False, f"weighted F1 {candidate_f1:.4f} < floor {floor:.4f}"
    if champion_f1 is None:
        return True, f"no champion yet; weighted F1 {candidate_f1:.4f} >= floor {floor:.4f}"
    if candidate_f1 >= champion_f1 + min_delta:
        return True, f"weighted F1 {candidate_f1:.4f} >= champion {champion_f1:.4f} + min_delta {min_delta}"
    return False, f"weighted F1 {candidate_f1:.4f} < champion {champion_f1:.4f} + min_delta {min_delta}"


def test_frame(split_fp: Path, raw_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """The test split as the pyfunc's input (base64 images) plus true class names."""
    from pipeline.adapters.serving import encode_image_file

    rows = [r for r in read_csv(split_fp) if r["split"] == "test"]
    frame = pd.DataFrame({"image": [encode_image_file(raw_dir / r["path"]) for r in rows]})
    return frame, [r["class_name"] for r in rows]


def rescore_champion(model_uri: str, frame: pd.DataFrame, truth: list[str]) -> float:
    """Weighted F1 of the current champion on today's test split (never a stale logged metric)."""
    pred = tracking.load_pyfunc(model_uri).predict(frame)["label"].tolist()
    return float(f1_score(truth, pred, average="weighted", zero_division=0))


def dvc_hashes(lock_fp: Path) -> dict[str, str]:
    """md5s DVC recorded for the raw data and the split (empty when not run under DVC)."""
    if not lock_fp.exists():
        return {}
    lock = yaml.safe_load(lock_fp.read_text()) or {}
    out = {}
    for stage, path, tag in (("ingest", paths.RAW_DIR.as_posix(), "dvc_data_md5"),
                             ("split", paths.SPLIT.as_posix(), "dvc_split_md5")):
        for o in lock.get("stages", {}).get(stage, {}).get("outs", []):
            if o.get("path") == path:
                out[tag] = o.get("md5", "")
    return out


def lineage_files(lock_fp: Path, params_fp: Path) -> dict[str, str]:
    """What ``python -m pipeline reproduce`` needs, as the run's ``lineage/`` artifacts: the params file as read and
    ``dvc.lock`` without the ``register`` stage (that is this very run). Empty when not run under DVC.

    Under ``dvc repro`` the lock already holds every stage before this one (DVC writes it stage by stage).
    """
    if not lock_fp.exists():
        return {}
    lock = yaml.safe_load(lock_fp.read_text(encoding="utf-8")) or {}
    lock.get("stages", {}).pop("register", None)
    return {"lineage/dvc.lock": yaml.safe_dump(lock, allow_unicode=True, sort_keys=False),
            "lineage/params.yaml": params_fp.read_text(encoding="utf-8")}


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_card(cfg: Config, version: str, metrics: dict, per_class: list[dict], counts: dict, lineage: dict,
               decision: str, reason: str, members: list[dict], backbones: dict | None = None) -> str:
    backbones = backbones or {}
    lines = [f"# {cfg.registry.model_name} v{version}", "",
             f"**Gate:** {decision} — {reason}", "",
             "## Data", f"- landing: `{cfg.data.landing_uri}`",
             *(f"- {k}: `{v}`" for k, v in lineage.items()),
             "- class counts (validated): " + ", ".join(f"{c} {n}" for c, n in counts.items()), "",
             "## Test metrics (held-out split)", "| metric | value |", "|---|---|",
             *(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)),
             "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
             *(f"| {r['class_name']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
               for r in per_class),
             *(["", "## Backbones (each transfer-trained once, same test split)",
                 "| backbone | weighted F1 | macro F1 | accuracy |", "|---|---|---|---|",
                 *(f"| {b} | {m['weighted_f1']:.4f} | {m['macro_f1']:.4f} | {m['accuracy']:.4f} |"
                   for b, m in backbones.items())] if backbones else []),
             "", "## Model",
             f"- bag of {len(members)} × `{cfg.model.backbone}` @ {cfg.model.img_size}px, weights "
             f"{members[0]['weights_source']}, freeze `{cfg.model.freeze}`",
             f"- epochs {cfg.train.epochs}, batch {cfg.train.batch_size}, lr {cfg.train.lr}, focal gamma "
             f"{cfg.train.focal_gamma}, label smoothing {cfg.train.label_smoothing}, CutMix p "
             f"{cfg.train.cutmix_prob}, sampler power {cfg.train.sampler_power}",
             f"- trained on {members[0]['device']} ({platform.machine()}, {platform.node()}), "
             f"{sum(m['train_seconds'] for m in members):.0f} s in all; profile `{cfg.profile}`"]
    return "\n".join(lines) + "\n"


def run_register(cfg: Config, split_fp: Path, raw_dir: Path, models_dir: Path, metrics_fp: Path,
                 reports_dir: Path, decision_fp: Path, lock_fp: Path = Path("dvc.lock"),
                 params_fp: Path = paths.PARAMS) -> dict:
    dirs = member_dirs(cfg.bag.seeds, models_dir)
    cid = candidate_id(dirs, metrics_fp)
    metrics = json.loads(metrics_fp.read_text())
    name = cfg.registry.model_name
    client = tracking.connect(cfg.registry.experiment)
    existing = tracking.version_by_candidate(client, name, cid)
    if existing is not None and existing.tags.get("gate"):
        _logger.info("version %s already holds these model files; not registering again", existing.version)
        return _write_decision(decision_fp, name, existing.version, existing.run_id, metrics["weighted_f1"],
                               existing.tags["gate"], existing.tags.get("gate_reason", ""),
                               existing.tags.get("champion_f1_rescored"))
    validation = json.loads((reports_dir / "validation.json").read_text(encoding="utf-8"))
    stored = lineage_files(lock_fp, params_fp)
    lineage = {"data_fingerprint": validation["fingerprint"], **dvc_hashes(lock_fp),
               "git_commit": tracking.git_commit(None), "params_hash": cfg.params_hash(),
               **({"dvc_lock_sha256": text_sha256(stored["lineage/dvc.lock"]),
                   "params_sha256": text_sha256(stored["lineage/params.yaml"])} if stored else {})}
    frame, truth = test_frame(split_fp, raw_dir)
    if existing is None:
        split_df = pd.DataFrame(read_csv(split_fp))
        run_id, version = tracking.log_candidate(
            cfg_dict=cfg.to_dict(), candidate_id=cid, metrics=metrics, member_dirs=dirs,
            artifact_paths=[reports_dir, split_fp, split_fp.parent / "quarantine.csv"], artifact_texts=stored,
            dataset_frame=split_df, dataset_source=cfg.data.landing_uri, lineage=lineage,
            input_example=frame.head(2), model_name=name, backbone_dirs=backbone_dirs(cfg.backbones, models_dir),
            # Set by the Airflow DAG (one parent run per DAG run); a workstation `dvc repro` opens its own.
            parent_run_id=os.environ.get("PIPELINE_PARENT_RUN_ID") or None)
    else:  # registered by an earlier attempt that died before the gate: finish it
        run_id, version = existing.run_id, existing.version
    champion = tracking.version_by_alias(client, name, "champion")
    champion_f1 = None
    if champion is not None and champion.version != version:
        champion_f1 = rescore_champion(f"models:/{name}@champion", frame, truth)
        _logger.info("champion v%s re-scored on this test split: weighted F1 %.4f", champion.version, champion_f1)
    promote, reason = gate(metrics["weighted_f1"], champion_f1, cfg.registry.f1_floor, cfg.registry.min_delta)
    decision = "promoted" if promote else "rejected"
    per_class = json.loads((reports_dir / "eval" / "per_class.json").read_text(encoding="utf-8"))
    members = [json.loads((d / "meta.json").read_text(encoding="utf-8")) for d in dirs]
    card = model_card(cfg, version, {k: v for k, v in metrics.items() if k not in ("members", "backbones")},
                      per_class, validation["class_counts"], lineage, decision, reason, members,
                      metrics.get("backbones"))
    weights = {d.name: m["model_sha256"] for d, m in zip(dirs, members)}
    tags = {**lineage, "weights_sha256": json.dumps(weights, sort_keys=True),
            "weighted_f1": f"{metrics['weighted_f1']:.6f}", "macro_f1": f"{metrics['macro_f1']:.6f}",
            "per_class_f1": json.dumps({r["class_name"]: round(r["f1"], 4) for r in per_class}, ensure_ascii=False),
            "gate_reason": reason, "champion_f1_rescored": "" if champion_f1 is None else f"{champion_f1:.6f}",
            "champion_version_at_gate": "" if champion is None else champion.version, "profile": cfg.profile}
    # The decision tag goes last, with the alias switch: a version without it is unfinished and is resumed.
    client.log_text(run_id, card, "model_card.md")
    tracking.finish_version(client, name, version, tags, card, promote)
    client.set_model_version_tag(name, version, "gate", decision)
    _logger.info("registered %s v%s: %s (%s)", name, version, decision, reason)
    return _write_decision(decision_fp, name, version, run_id, metrics["weighted_f1"], decision, reason,
                           tags["champion_f1_rescored"])


def _write_decision(fp: Path, name: str, version: str, run_id: str, f1: float, decision: str, reason: str,
                    champion_f1) -> dict:
    out = {"model_name": name, "model_version": str(version), "run_id": run_id, "weighted_f1": f1,
           "gate": decision, "reason": reason, "champion_f1_rescored": champion_f1 or None}
    fp.parent.mkdir(parents=True, exist_ok=True)
    fp.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
