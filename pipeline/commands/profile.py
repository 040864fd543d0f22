"""The clone's one profile step: ``params.yaml`` = recipe ⊕ profile, and the DVC remote from the environment.

    python -m pipeline profile cpu-demo                       # then: dvc pull / dvc repro / dvc exp run -S …
    python -m pipeline profile test --set data.landing_uri=s3://landing/tiny/
    python -m pipeline profile full                           # the committed recipe again (git diff is empty)

``params.yaml`` is edited in place as ``dvc exp run -S`` edits it (see :mod:`pipeline.adapters.profiles`), so DVC
tracks every value and ``git diff params.yaml`` shows the profile. The remote ``store`` of the committed
``.dvc/config`` is completed in git-ignored ``.dvc/config.local`` from ``PIPELINE_DVC_REMOTE`` and
``AWS_ENDPOINT_URL``; the keys stay in ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``. A clone without a
``dvc.lock`` gets the one stored with the newest version registered on exactly these params (by Airflow or
another clone), so ``dvc pull`` fetches what was trained and ``dvc repro`` reruns only what differs.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.adapters.profiles import apply_profile
from pipeline.adapters.workspace import configure_clone_remote, project_home
from pipeline.core.config import load_config, parse_set
from pipeline.core.errors import PipelineError


def print_profile(name: str, assignments: list[str], take_lock: bool = True) -> int:
    root = project_home()
    if not (root / ".dvc").is_dir():
        raise PipelineError(f"{root} is not the clone's root (no .dvc/ folder); run this where dvc.yaml is")
    changes = apply_profile(root, name, parse_set(assignments))
    print(
        f"params.yaml: profile {name}"
        + (f", {len(changes)} values differ from the committed recipe:" if changes else " = the committed recipe")
    )
    for line in changes:
        print(f"  {line}")
    print(f"DVC remote store: {configure_clone_remote(root)}")
    print(f"dvc.lock: {lock_from_registry(root) if take_lock else 'left as it is (--no-lock)'}")
    print("next: dvc pull · dvc repro · dvc exp run -S key=value · dvc exp show")
    return 0


def lock_from_registry(root: Path) -> str:
    """Write the ``dvc.lock`` stored with the newest registered version trained on exactly these params (same
    ``params_hash``; by Airflow or any clone), so ``dvc pull`` fetches its outputs and ``dvc repro`` reruns only
    what differs. A ``dvc.lock`` already here is kept. Returns what happened, in words."""
    from pipeline.adapters import tracking
    from pipeline.commands.reproduce import fetch_lineage

    if (root / "dvc.lock").exists():
        return "kept the one here (delete it to take a registered version's)"
    cfg = load_config(root / "params.yaml")
    try:
        found = tracking.versions_tagged(cfg.registry.model_name, "params_hash", cfg.params_hash())
    except PipelineError as exc:  # the params and the remote are set; only the lock waits for the registry
        return f"not looked up ({exc})"
    found = [v for v in found if v.tags.get("dvc_lock_sha256")]
    if not found:
        return (
            f"none yet: no version of {cfg.registry.model_name} was trained on these params; `dvc repro` "
            "makes one (skip `dvc pull`)"
        )
    v = found[0]
    lock_text, _ = fetch_lineage(v.run_id, dict(v.tags), f"{v.name} v{v.version}")
    (root / "dvc.lock").write_text(lock_text, encoding="utf-8")
    return f"the one stored with {v.name} v{v.version} (same params): `dvc pull` fetches its data and models"
