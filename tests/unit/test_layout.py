"""The layers stay layers: what each folder may import, dvc.yaml's code deps, one source for each default.

See docs/ARCHITECTURE.md for the map these tests hold the code to.
"""

from __future__ import annotations

import ast
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devstack import code_deps
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

PKG = ROOT / "pipeline"
SERVICES = ("airflow", "mlflow", "dvc", "dvc_s3", "boto3", "botocore", "great_expectations")


def imported_modules(fp: Path) -> set[str]:
    """Every module an import statement in ``fp`` names (inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(fp.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def violations(files, forbidden) -> list[str]:
    bad = []
    for fp in files:
        for mod in sorted(imported_modules(fp)):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                bad.append(f"{fp.relative_to(ROOT)} imports {mod}")
    return bad


def py_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_core_imports_only_the_core():
    """The torch-only core: no stages, adapters, commands, harness, nor Airflow/MLflow/DVC/S3/GX."""
    forbidden = ("pipeline.stages", "pipeline.adapters", "pipeline.commands", "devstack", *SERVICES)
    assert violations(py_files(PKG / "core"), forbidden) == []


def test_stages_use_no_orchestrator_commands_or_harness():
    forbidden = ("airflow", "pipeline.commands", "pipeline.adapters.orchestration", "devstack")
    assert violations(py_files(PKG / "stages"), forbidden) == []


def test_nothing_shipped_imports_the_harness_and_only_orchestration_imports_airflow():
    assert violations(py_files(PKG), ("devstack",)) == []
    others = [p for p in py_files(PKG) if p != PKG / "adapters" / "orchestration.py"]
    assert violations(others, ("airflow",)) == []


def test_plugins_import_only_the_adapters():
    """plugins/ runs inside Airflow's api-server: it reads the pipeline through the adapters (MLflow through
    ``tracking``), never the stages, commands, core or harness, nor a service library of its own."""
    bad = []
    for fp in py_files(ROOT / "plugins"):
        for mod in imported_modules(fp):
            top = mod.split(".")[0]
            if (
                top in ("pipeline", "devstack")
                and mod != "pipeline.adapters"
                and not mod.startswith("pipeline.adapters.")
            ):
                bad.append(f"{fp.name} imports {mod}")
            if top in ("torch", "mlflow", "dvc", "boto3", "great_expectations", "timm"):
                bad.append(f"{fp.name} imports {mod}")
    assert py_files(ROOT / "plugins") and bad == []


def test_dag_files_import_only_the_orchestration_surface():
    bad = []
    for fp in py_files(ROOT / "dags"):
        for mod in imported_modules(fp):
            top = mod.split(".")[0]
            if (
                top in ("pipeline", "devstack")
                and not mod.startswith("pipeline.adapters.orchestration")
                and mod not in ("pipeline.adapters", "pipeline.adapters.orchestration")
            ):
                bad.append(f"{fp.name} imports {mod}")
            if top in ("torch", "pandas", "mlflow", "great_expectations", "dvc", "timm", "boto3"):
                bad.append(f"{fp.name} imports {mod}")
    assert bad == []


def test_dvc_yaml_code_deps_are_generated_and_fresh():
    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    assert code_deps.rewrite(text) == text, "run `python -m devstack code-deps`"


@pytest.mark.parametrize("stage", sorted(code_deps.STAGE_MODULES))
def test_code_deps_cover_what_a_stage_imports(stage):
    """What importing the CLI and the stage loads (every pipeline module in sys.modules) is listed in dvc.yaml."""
    module = code_deps.STAGE_MODULES[stage]
    probe = (
        f"import sys, pipeline.__main__, {module}\n"
        "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items()\n"
        "    if n.split('.')[0] == 'pipeline' and getattr(m, '__file__', None))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = {Path(f).resolve().relative_to(ROOT).as_posix() for f in out.stdout.split()}
    listed = set(_dvc_stage(stage)["deps"])
    assert loaded <= listed, sorted(loaded - listed)


def test_code_deps_find_lazy_imports(tmp_path):
    """A module imported only inside a function still counts (a planted one, in a copy of the package)."""
    import shutil

    shutil.copytree(PKG, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pipeline" / "core" / "planted.py").write_text("X = 1\n")
    split_fp = tmp_path / "pipeline" / "stages" / "split.py"
    split_fp.write_text(split_fp.read_text() + "\n\ndef _late():\n    from pipeline.core import planted\n")
    assert "pipeline/core/planted.py" in code_deps.stage_code("split", tmp_path)
    assert "pipeline/core/planted.py" not in code_deps.stage_code("ingest", tmp_path)


def _dvc_stage(name: str) -> dict:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return stages[name]["do"] if "do" in stages[name] else stages[name]


def test_dvc_yaml_paths_are_the_cli_defaults():
    """Each stage's command in dvc.yaml passes exactly the paths of pipeline/stages/paths.py (the CLI defaults)."""
    from pipeline.__main__ import build_parser

    parser = build_parser()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, spec in stages.items():
        spec = spec.get("do", spec)
        argv = shlex.split(spec["cmd"].replace("${key}", "b").replace("${item}", "0"))[3:]
        given = vars(parser.parse_args(argv))
        defaults = vars(
            parser.parse_args([argv[0], *(["--member", "0", "--out-dir", "x"] if argv[0] == "train" else [])])
        )
        for key, value in given.items():
            if key not in ("out_dir", "member", "backbone", "docs_dir"):
                assert value == defaults[key], (name, key, value, defaults[key])


def test_config_defaults_are_the_committed_recipe():
    """The dataclass defaults and params.yaml agree (one recipe, not two); data.* is the landing's own."""
    from pipeline.core import config

    full = config.load_config(ROOT / "params.yaml")
    for section, cls in config._SECTIONS.items():
        if section == "data":
            continue
        for f in dataclasses.fields(cls):
            assert getattr(cls(), f.name) == getattr(getattr(full, section), f.name), f"{section}.{f.name}"
    assert full.validate.max_pixels == config.MAX_PIXELS and full.validate.max_bytes == config.MAX_BYTES


def test_registered_model_name_has_one_source(monkeypatch):
    """Commands and the batch DAG default to the profile's registry.model_name (no copy in code or Makefile)."""
    from pipeline.adapters.workspace import default_model_uri

    monkeypatch.delenv("PIPELINE_MODEL_NAME", raising=False)
    for profile in ("full", "cpu-demo", "test"):
        monkeypatch.setenv("PIPELINE_PROFILE", profile)
        params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        if profile != "full":
            params["registry"].update(
                yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text()).get("registry", {})
            )
        assert default_model_uri() == f"models:/{params['registry']['model_name']}@champion"
    for fp in [*py_files(PKG), *py_files(ROOT / "dags"), ROOT / "Makefile"]:
        text = fp.read_text(encoding="utf-8")
        # config.py's default is held equal to params.yaml above; audit.py's is a docstring example.
        assert "-defect-classifier" not in text or fp.name in ("config.py", "audit.py"), fp


def test_every_param_a_stage_lists_is_in_the_recipe():
    """DVC fails a stage whose listed param is missing from params.yaml ("Parameters 'bag.folds' are missing")."""
    recipe = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    missing = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for key in body.get("params", []):
            key = key if isinstance(key, str) else next(iter(key))
            if "${" in key:
                key = key.split(".${")[0]  # backbones.${key}: the mapping itself must be there
            node = recipe
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{name}: {key}")
                    break
                node = node[part]
    assert not missing, missing


def test_only_settings_reads_pipeline_variables(monkeypatch):
    """Every PIPELINE_* variable has one reader and one default (pipeline/core/settings.py); with PIPELINE_PROFILE
    unset, training (orchestration) and batch prediction (workspace) agree on the profile and so on the model."""
    import re

    from pipeline.adapters import orchestration, workspace
    from pipeline.core import settings

    read = re.compile(r"""(environ\.get|getenv)\(\s*["']PIPELINE_|environ\[\s*["']PIPELINE_\w+["']\s*\](?!\s*=[^=])""")
    offenders = [
        f"{fp.relative_to(ROOT)}:{n}"
        for fp in [*py_files(PKG), *py_files(ROOT / "dags"), *py_files(ROOT / "plugins"), *py_files(ROOT / "devstack")]
        if fp.name != "settings.py"
        for n, line in enumerate(fp.read_text(encoding="utf-8").splitlines(), 1)
        if read.search(line)
    ]
    assert offenders == []
    monkeypatch.delenv("PIPELINE_PROFILE", raising=False)
    monkeypatch.delenv("PIPELINE_MODEL_NAME", raising=False)
    assert orchestration.default_profile() == settings.DEFAULT_PROFILE
    cpu_demo = yaml.safe_load((ROOT / "profiles" / f"{settings.DEFAULT_PROFILE}.yaml").read_text())["registry"]
    assert workspace.default_model_uri() == f"models:/{cpu_demo['model_name']}@champion"


def test_stages_write_their_outputs_atomically():
    """A stage killed mid-write must not leave half a DVC output: stages write through pipeline.core.io (temp file,
    fsync, rename), never with write_text / write_bytes / open(..., "w") directly."""
    import re

    direct = re.compile(r"""\.write_(text|bytes)\(|open\([^)]*["'][wa]b?["']""")
    offenders = [
        f"{fp.name}:{n}"
        for fp in py_files(PKG / "stages")
        for n, line in enumerate(fp.read_text(encoding="utf-8").splitlines(), 1)
        if direct.search(line)
    ]
    assert offenders == []


def test_adapters_reach_commands_and_stages_only_through_orchestration():
    """The adapters serve the stages and commands; only ``orchestration`` (the DAGs' surface, as __main__ is the
    CLI's) may call up into a command or read the stages' paths."""
    others = [p for p in py_files(PKG / "adapters") if p.name != "orchestration.py"]
    assert violations(others, ("pipeline.commands", "pipeline.stages")) == []
    allowed = ("pipeline.commands.predict", "pipeline.stages.paths")
    up = {
        m
        for m in imported_modules(PKG / "adapters" / "orchestration.py")
        if m.startswith(("pipeline.commands", "pipeline.stages")) and m not in ("pipeline.commands", "pipeline.stages")
    }  # `from pipeline.stages import paths` names both
    assert {m for m in up if not any(m == a or m.startswith(a + ".") for a in allowed)} == set(), up
