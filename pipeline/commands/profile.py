"""The clone's one profile step: ``params.yaml`` = recipe ⊕ profile, and the DVC remote from the environment.

    python -m pipeline profile cpu-demo                       # then: dvc pull / dvc repro / dvc exp run -S …
    python -m pipeline profile test --set data.landing_uri=s3://landing/tiny/
    python -m pipeline profile full                           # the committed recipe again (git diff is empty)

``params.yaml`` is edited in place as ``dvc exp run -S`` edits it (see :mod:`pipeline.adapters.profiles`), so DVC
tracks every value and ``git diff params.yaml`` shows the profile. The remote ``store`` of the committed
``.dvc/config`` is completed in git-ignored ``.dvc/config.local`` from ``PIPELINE_DVC_REMOTE`` and
``AWS_ENDPOINT_URL``; the keys stay in ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``.
"""
from __future__ import annotations

from pipeline.adapters.profiles import apply_profile
from pipeline.adapters.workspace import configure_clone_remote, project_home
from pipeline.core.config import parse_set
from pipeline.core.errors import PipelineError


def print_profile(name: str, assignments: list[str]) -> int:
    root = project_home()
    if not (root / ".dvc").is_dir():
        raise PipelineError(f"{root} is not the clone's root (no .dvc/ folder); run this where dvc.yaml is")
    changes = apply_profile(root, name, parse_set(assignments))
    print(f"params.yaml: profile {name}" + (f", {len(changes)} values differ from the committed recipe:"
                                              if changes else " = the committed recipe"))
    for line in changes:
        print(f"  {line}")
    print(f"DVC remote store: {configure_clone_remote(root)}")
    print("next: dvc pull (outputs of the dvc.lock at hand) · dvc repro · dvc exp run -S key=value · dvc exp show")
    return 0
