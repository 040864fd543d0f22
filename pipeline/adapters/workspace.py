"""DVC workspaces for orchestrated runs, and running one DVC stage in them.

Airflow must not rewrite the committed ``params.yaml`` (the full GPU recipe) to apply a profile.
So an orchestrated run works in a DVC workspace under ``.local/workspace`` (``PIPELINE_WORKSPACE``):
a copy of ``dvc.yaml`` and the ``pipeline`` package plus a ``params.yaml`` merged from the committed
one, ``profiles/<profile>.yaml`` and the run's overrides — what ``dvc exp run -S`` does, made
explicit. Each task then runs ``dvc repro --single-item <stage>`` there: exactly the workstation's
commands, with ``dvc.lock``, the DVC cache and a remote on the embedded S3 bucket ``dvc``.
"""
from __future__ import annotations

import filecmp
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.config import REPLACED_WHOLE, config_from_dict, deep_merge, parse_set, read_yaml
from pipeline.core.errors import ConfigError, PipelineError, StageFailed

_logger = logging.getLogger(__name__)


def project_home() -> Path:
    return Path(os.environ.get("PIPELINE_HOME", Path(__file__).resolve().parents[2]))


def default_workspace() -> Path:
    local = Path(os.environ.get("PIPELINE_LOCAL", project_home() / ".local"))
    return Path(os.environ.get("PIPELINE_WORKSPACE", local / "workspace"))


def merged_params(home: Path, profile: str, overrides: dict) -> dict:
    params = read_yaml(home / "params.yaml")
    if profile not in ("", "full"):
        prof_fp = home / "profiles" / f"{profile}.yaml"
        if not prof_fp.exists():
            known = sorted(p.stem for p in (home / "profiles").glob("*.yaml"))
            raise ConfigError(f"unknown profile {profile!r}; known: full, {', '.join(known)}")
        params = deep_merge(params, read_yaml(prof_fp), replace=REPLACED_WHOLE)
    params = deep_merge(params, overrides)
    params["profile"] = profile or "full"
    config_from_dict(params)  # fail here, naming the key, before any stage runs
    return params


def form_overrides(form: dict) -> dict:
    """The training DAG's Params (a form in the UI) as a params override mapping."""
    overrides: dict = {"data": {"landing_uri": form["landing_uri"]}}
    if form.get("epochs"):
        overrides["train"] = {"epochs": int(form["epochs"])}
    if form.get("bag_size"):
        overrides["bag"] = {"seeds": list(range(int(form["bag_size"])))}
    if form.get("backbone"):
        overrides["model"] = {"backbone": form["backbone"]}
    return deep_merge(overrides, parse_set(list(form.get("set") or [])))


def _sync_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, touching only files that differ (DVC hashes content anyway)."""
    dst.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for path in src.rglob("*"):
        if "__pycache__" in path.parts or path.is_dir():
            continue
        rel = path.relative_to(src)
        wanted.add(rel)
        target = dst / rel
        if not target.exists() or not filecmp.cmp(path, target, shallow=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    for path in dst.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.relative_to(dst) not in wanted:
            path.unlink()


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def dvc(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("GIT_PYTHON_REFRESH", "quiet")
    env.setdefault("DVC_NO_ANALYTICS", "1")  # no usage reports from servers (DVC sends them by default)
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=ws, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(args)}` failed in {ws}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def prepare_workspace(ws: Path, profile: str, overrides: dict | None = None, home: Path | None = None,
                      git: bool = False) -> Path:
    """Create or refresh the workspace; idempotent (unchanged inputs leave every file untouched).

    ``git``: also make it a Git repository with a first commit, so `dvc exp run` / `dvc exp show` work there
    (a workstation's choice; the orchestrated workspace needs no Git).
    """
    home = home or project_home()
    params = merged_params(home, profile, overrides or {})
    ws.mkdir(parents=True, exist_ok=True)
    _sync_tree(home / "pipeline", ws / "pipeline")
    _write_if_changed(ws / "dvc.yaml", (home / "dvc.yaml").read_text(encoding="utf-8"))
    _write_if_changed(ws / "params.yaml", yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    if not (ws / ".dvc").exists():
        dvc(ws, "init", "--no-scm", "--quiet")
        dvc(ws, "config", "core.autostage", "false")
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    remote = os.environ.get("PIPELINE_DVC_REMOTE", "s3://dvc/cache")
    dvc(ws, "remote", "add", "--force", "--default", "store", remote)
    if endpoint:
        dvc(ws, "remote", "modify", "store", "endpointurl", endpoint)
    if git:
        _git_baseline(ws)
    _logger.info("workspace %s ready (profile %s)", ws, profile or "full")
    return ws


def _git_baseline(ws: Path) -> None:
    """`git init` + commit of the pipeline files (DVC git-ignores the data and models it tracks)."""
    def run(*args: str) -> None:
        proc = subprocess.run(["git", "-c", "user.name=pipeline", "-c", "user.email=pipeline@localhost", *args],
                              cwd=ws, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PipelineError(f"`git {' '.join(args)}` failed in {ws}: {(proc.stdout + proc.stderr)[-1000:]}")

    if not (ws / ".git").exists():
        run("init", "--quiet")
    dvc(ws, "config", "core.no_scm", "false")
    run("add", "--all")
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=ws).returncode != 0:
        run("commit", "--quiet", "-m", "pipeline workspace")


def run_stage(ws: Path, stage: str, extra_env: dict[str, str] | None = None) -> str:
    """``dvc repro --single-item <stage>`` in ``ws``; streams DVC's output into our log, raises on failure.

    ``extra_env`` reaches the stage's command (DVC passes its environment on), e.g. the MLflow parent run id.
    """
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", **(extra_env or {}))
    cmd = [str(Path(sys.executable).parent / "dvc"), "repro", "--single-item", stage]
    _logger.info("running %s in %s", " ".join(cmd), ws)
    proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        _logger.info("%s", line)
        tail = (tail + [line])[-40:]
    if proc.wait() != 0:
        starts = [i for i, t in enumerate(tail) if t.startswith(("error:", "error (transient):"))]
        if starts:
            body = [t for t in tail[starts[-1]:] if not t.startswith("ERROR: failed to reproduce")]
            head, _, message = "\n".join(body).partition(": ")
            raise StageFailed(f"stage {stage} failed: {message}", transient=head == "error (transient)")
        # DVC itself failed (lock held, missing output...): worth one more try.
        raise StageFailed(f"stage {stage} failed:\n" + "\n".join(tail[-15:]), transient=True)
    return stage


def default_model_uri() -> str:
    """``models:/<name>@champion``: ``PIPELINE_MODEL_NAME``, else ``registry.model_name`` of the profile in
    ``PIPELINE_PROFILE`` (the committed params.yaml when unset): the one source of the registered model's name."""
    name = os.environ.get("PIPELINE_MODEL_NAME")
    if not name:
        params = merged_params(project_home(), os.environ.get("PIPELINE_PROFILE", "full"), {})
        name = config_from_dict(params).registry.model_name
    return f"models:/{name}@champion"
