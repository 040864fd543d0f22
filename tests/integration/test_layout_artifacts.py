"""The layout seen from outside: what a registered model ships, and DVC noticing code changes stage by stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.integration.helpers import MODEL

pytestmark = pytest.mark.integration

MODEL_CODE = {
    "pipeline/__init__.py",
    "pipeline/adapters/__init__.py",
    "pipeline/adapters/serving.py",
    *(f"pipeline/core/{p.name}" for p in (ROOT / "pipeline" / "core").glob("*.py")),
}


def test_registered_model_ships_the_core_and_the_pyfunc_only(trained, stack, tmp_path):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@champion", dst_path=str(tmp_path)))
    code = {p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*.py")}
    assert code == MODEL_CODE
    assert not [p for p in local.rglob("*") if p.name in ("services.py", "celery_stack.py", "orchestration.py")]
    # and the package still serves from a process that has only that code
    probe = (
        "import mlflow, sys, base64, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({str(local)!r})\n"
        "import pipeline; assert pipeline.__file__.startswith(" + repr(str(local)) + "), pipeline.__file__\n"
        "print(m.predict(pd.DataFrame({'image': [base64.b64encode(open(sys.argv[1], 'rb').read()).decode()]})))"
    )
    img = next((trained / "data" / "raw").rglob("*.png"))
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", probe, str(img)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "label" in proc.stdout


def _changed_stages(ws: Path, env: dict) -> set[str]:
    out = run_cli(["dvc", "status", "--json"], env, cwd=ws)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(out.stdout or "{}")
    # ingest and label_exclusions re-check the bucket / registry every time ("always changed"); count them only when
    # their code changed
    return {stage for stage, why in status.items() if why != ["always changed"]}


def test_dvc_status_follows_code(trained, stack_env, tmp_path):
    """Editing one file of the core makes exactly the stages that run it out of date; the harness makes none."""
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws, symlinks=True, ignore=shutil.ignore_patterns(".cache"))
    assert _changed_stages(ws, stack_env) == set()
    backbones = {f"backbone@{b}" for b in ("test_efficientnet", "test_resnet")}
    cases = {
        "pipeline/core/losses.py": backbones | {"train@0"},
        # label_exclusions reads the registry through adapters/tracking, which can load the bag (serving → core)
        "pipeline/core/data.py": backbones | {"label_exclusions", "train@0", "evaluate", "label_issues", "register"},
        "pipeline/stages/split.py": {"split"},
        "pipeline/core/io.py": {
            "ingest",
            "label_exclusions",
            "validate",
            "split",
            *backbones,
            "train@0",
            "evaluate",
            "label_issues",
            "register",
        },
    }
    for rel, expected in cases.items():
        fp = ws / rel
        original = fp.read_bytes()
        fp.write_bytes(original + b"\n# one more line\n")
        assert _changed_stages(ws, stack_env) == expected, rel
        fp.write_bytes(original)
    shutil.copytree(ROOT / "devstack", ws / "devstack", ignore=shutil.ignore_patterns("__pycache__"))
    (ws / "devstack" / "services.py").write_text("# edited\n")
    assert _changed_stages(ws, stack_env) == set()
