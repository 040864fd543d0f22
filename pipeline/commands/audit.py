"""Audit and rollback of registered versions (through pipeline.tracking's MLflow client).

    python -m pipeline audit --model elpv-defect-classifier 1 2
    python -m pipeline rollback --model elpv-defect-classifier --to 1 --reason "v2 misreads stains"

``audit`` prints what differs between two versions: data fingerprint and class counts, params, overall and
per-class metrics, gate decisions. ``rollback`` moves ``champion`` back to an earlier version in one alias write,
keeps the version it replaces as ``previous_champion``, and records who and why as tags.
"""

from __future__ import annotations

import getpass
import json
import time

from pipeline.core import settings
from pipeline.core.errors import PipelineError


def _version(client, name: str, version: str):
    from pipeline.adapters.tracking import registry_errors

    with registry_errors(f"model {name!r} version {version}"):  # missing → final; an outage → transient
        return client.get_model_version(name, str(version))


def _run_params(client, run_id: str) -> dict[str, str] | None:
    """The run's params; None when the registry says the run is gone (an outage raises, never reads as {})."""
    from pipeline.adapters.tracking import NotInRegistry, registry_errors

    if not run_id:
        return None
    try:
        with registry_errors(f"run {run_id}"):
            return dict(client.get_run(run_id).data.params)
    except NotInRegistry:
        return None


def _class_counts(description: str) -> str:
    for line in (description or "").splitlines():
        if line.startswith("- class counts"):
            return line.split(":", 1)[1].strip()
    return ""


def diff_versions(client, name: str, a: str, b: str) -> list[tuple[str, str, str]]:
    """Rows ``(field, value in a, value in b)`` for every field that differs."""
    va, vb = _version(client, name, a), _version(client, name, b)
    rows: list[tuple[str, str, str]] = []
    tag_keys = [
        "data_fingerprint",
        "dvc_data_md5",
        "dvc_split_md5",
        "git_commit",
        "params_hash",
        "profile",
        "dvc_lock_sha256",
        "params_sha256",
        "weights_sha256",
        "weighted_f1",
        "macro_f1",
        "gate",
        "gate_reason",
        "gate_candidate_wf1",
        "champion_f1_rescored",
        "gate_delta_wf1",
        "gate_delta_ci_low",
        "gate_delta_ci_high",
        "gate_p_improve",
        "gate_n_test",
        "calibration_temperature",
        "calibration_ece_test_before",
        "calibration_ece_test_after",
    ]
    for key in tag_keys:
        x, y = va.tags.get(key, ""), vb.tags.get(key, "")
        if x != y:
            rows.append((f"tag {key}", x, y))
    ca, cb = _class_counts(va.description), _class_counts(vb.description)
    if ca != cb:
        rows.append(("class counts", ca, cb))
    fa = json.loads(va.tags.get("per_class_f1", "{}"))
    fb = json.loads(vb.tags.get("per_class_f1", "{}"))
    for cls in sorted(set(fa) | set(fb)):
        if fa.get(cls) != fb.get(cls):
            rows.append((f"F1 {cls}", str(fa.get(cls, "")), str(fb.get(cls, ""))))
    pa, pb = _run_params(client, va.run_id), _run_params(client, vb.run_id)
    if pa is None or pb is None:  # nothing to compare: say so instead of listing every param as changed
        rows.append(("params", "(run gone)" if pa is None else "(kept)", "(run gone)" if pb is None else "(kept)"))
        pa = pb = {}
    for key in sorted(set(pa) | set(pb)):
        if pa.get(key) != pb.get(key):
            rows.append((f"param {key}", pa.get(key, ""), pb.get(key, "")))
    return rows


def print_diff(name: str, a: str, b: str) -> int:
    from pipeline.adapters import tracking

    client = tracking.connect_registry()
    rows = diff_versions(client, name, a, b)
    width = max([len(r[0]) for r in rows] + [5])
    print(f"{'field':<{width}}  v{a:<30}  v{b}")
    for field, x, y in rows:
        print(f"{field:<{width}}  {x[:30]:<31}  {y[:60]}")
    if not rows:
        print("(no differences)")
    va, vb = _version(client, name, a), _version(client, name, b)
    same = [
        k
        for k in ("data_fingerprint", "dvc_data_md5", "dvc_split_md5", "git_commit", "params_hash")
        if va.tags.get(k) and va.tags.get(k) == vb.tags.get(k)
    ]
    if same:
        print("unchanged: " + ", ".join(f"{k}={va.tags[k][:12]}" for k in same))
    return 0


def rollback(name: str, to: str, reason: str) -> dict[str, str]:
    from pipeline.adapters import credentials, tracking

    client = tracking.connect_registry()
    target = _version(client, name, to)
    current = tracking.version_by_alias(client, name, "champion")
    if current is not None and current.version == target.version:
        raise PipelineError(f"version {to} is already the champion of {name!r}")
    if not target.tags.get("gate"):  # logged and registered by hand, not by the pipeline's register stage
        raise PipelineError(
            f"version {to} of {name!r} was not registered by the pipeline's gate (no 'gate' tag): "
            f"rollback moves 'champion' only to versions the register stage wrote"
        )
    who = settings.user() or getpass.getuser()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {
        "rollback_by": who,
        "rollback_account": credentials.account(),
        "rollback_reason": reason,
        "rollback_at": stamp,
        "rollback_from": current.version if current else "",
    }
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, target.version, key, value)
        if current is not None:
            client.set_registered_model_alias(name, "previous_champion", current.version)
        client.set_registered_model_alias(name, "champion", target.version)
    except Exception as exc:
        status = credentials.refused(exc)
        if status is None:
            raise
        raise PipelineError(
            f"MLflow refused the rollback for account {credentials.account()} (HTTP {status}): "
            f"moving 'champion' of {name!r} needs the engineer or pipeline role; the champion "
            f"is still version {current.version if current else '(none)'}"
        ) from None
    return {
        "model_name": name,
        "champion": target.version,
        "previous_champion": current.version if current else "",
        "by": who,
        "reason": reason,
    }
