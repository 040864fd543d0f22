"""DVC projects: orchestrated workspaces, running one stage in them, the clone's remote, and DVC's own hashes.

Airflow must not rewrite a checkout's ``params.yaml`` (the committed recipe), so an orchestrated run works in a
DVC workspace under ``.local/workspace`` (``PIPELINE_WORKSPACE``): a copy of ``dvc.yaml`` and the ``pipeline``
package plus a ``params.yaml`` merged from the recipe, ``profiles/<profile>.yaml`` and the run's overrides
(:mod:`pipeline.adapters.profiles`). Each task then runs ``dvc repro --single-item <stage>`` there: exactly the
commands a workstation runs in the clone's own root, with the same ``dvc.lock`` for the same profile and data,
and the cache pushed to the same remote (``store``, the S3 bucket ``dvc``). So a clone's ``dvc pull`` fetches
what Airflow trained for the same lock, and ``python -m pipeline reproduce`` rebuilds a workspace from the lock
stored with a registered version.
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

from pipeline.adapters.profiles import merged_params
from pipeline.core import settings
from pipeline.core.config import config_from_dict
from pipeline.core.errors import PipelineError, StageFailed

_logger = logging.getLogger(__name__)
DEFAULT_REMOTE = "s3://dvc/cache"  # the DVC remote `store` of the clone (.dvc/config) and of every workspace


def project_home() -> Path:
    return settings.home()


def default_workspace() -> Path:
    return settings.workspace()


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
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=ws, env=env, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(args)}` failed in {ws}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def remote_url() -> str:
    """The DVC remote's URL: ``PIPELINE_DVC_REMOTE``, else :data:`DEFAULT_REMOTE`."""
    return settings.dvc_remote(DEFAULT_REMOTE)


def init_dvc(ws: Path) -> None:
    """A workspace: ``dvc init --no-scm`` once, remote ``store`` = :func:`remote_url` at ``AWS_ENDPOINT_URL``."""
    if not (ws / ".dvc").exists():
        dvc(ws, "init", "--no-scm", "--quiet")
        dvc(ws, "config", "core.autostage", "false")
    dvc(ws, "remote", "add", "--force", "--default", "store", remote_url())
    if os.environ.get("AWS_ENDPOINT_URL"):
        dvc(ws, "remote", "modify", "store", "endpointurl", os.environ["AWS_ENDPOINT_URL"])


def configure_clone_remote(root: Path) -> str:
    """The clone's remote ``store`` from the environment, in git-ignored ``.dvc/config.local``; returns it.

    The committed ``.dvc/config`` holds ``store`` = :data:`DEFAULT_REMOTE` and nothing else (no endpoint, no keys).
    ``PIPELINE_DVC_REMOTE`` and ``AWS_ENDPOINT_URL`` go into ``.dvc/config.local``, rewritten each time (an unset
    variable removes its line); the keys stay in ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, read by DVC.
    """
    for option, var in (("url", "PIPELINE_DVC_REMOTE"), ("endpointurl", "AWS_ENDPOINT_URL")):
        if os.environ.get(var):
            dvc(root, "remote", "modify", "--local", "store", option, os.environ[var])
        else:
            dvc(root, "remote", "modify", "--local", "store", option, "--unset", check=False)
    return f"{remote_url()} at {os.environ.get('AWS_ENDPOINT_URL') or 'the AWS default endpoint'}"


def prepare_workspace(
    ws: Path, profile: str, overrides: dict | None = None, home: Path | None = None, git: bool = False
) -> Path:
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
    init_dvc(ws)
    if git:
        _git_baseline(ws)
    _logger.info("workspace %s ready (profile %s)", ws, profile or "full")
    return ws


def _git_baseline(ws: Path) -> None:
    """`git init` + commit of the pipeline files (DVC git-ignores the data and models it tracks)."""

    def run(*args: str) -> None:
        proc = subprocess.run(
            ["git", "-c", "user.name=pipeline", "-c", "user.email=pipeline@localhost", *args],
            cwd=ws,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise PipelineError(f"`git {' '.join(args)}` failed in {ws}: {(proc.stdout + proc.stderr)[-1000:]}")

    if not (ws / ".git").exists():
        run("init", "--quiet")
    dvc(ws, "config", "core.no_scm", "false")
    run("add", "--all")
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=ws).returncode != 0:
        run("commit", "--quiet", "-m", "pipeline workspace")


def run_stage(ws: Path, stage: str, extra_env: dict[str, str] | None = None, force: bool = False) -> str:
    """``dvc repro --single-item <stage>`` in ``ws``; streams DVC's output into our log, raises on failure.

    ``extra_env`` reaches the stage's command (DVC passes its environment on), e.g. the MLflow parent run id;
    ``force`` runs it even when DVC finds it up to date (``reproduce --retrain``).
    """
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        DVC_NO_ANALYTICS="1",
        **(extra_env or {}),
    )
    cmd = [str(Path(sys.executable).parent / "dvc"), "repro", "--single-item", *(["--force"] if force else []), stage]
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
            body = [t for t in tail[starts[-1] :] if not t.startswith("ERROR: failed to reproduce")]
            head, _, message = "\n".join(body).partition(": ")
            raise StageFailed(f"stage {stage} failed: {message}", transient=head == "error (transient)")
        # DVC itself failed (lock held, missing output...): worth one more try.
        raise StageFailed(f"stage {stage} failed:\n" + "\n".join(tail[-15:]), transient=True)
    return stage


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for ``path``: of the bytes for a file; for a folder, of its listing (sorted
    ``{"md5", "relpath"}`` entries as JSON) with ``.dir`` appended — what ``dvc.lock`` holds, computed without DVC."""
    import hashlib
    import json

    def md5(fp: Path) -> str:
        h = hashlib.md5()
        with open(fp, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    if path.is_file():
        return md5(path)
    entries = sorted(
        ({"md5": md5(p), "relpath": p.relative_to(path).as_posix()} for p in path.rglob("*") if p.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def dvc_dir_listing(ws: Path, md5: str) -> dict[str, str] | None:
    """``relpath -> md5`` of a folder DVC recorded as ``md5`` (``….dir``), from ``ws``'s cache; None if absent."""
    import json

    fp = ws / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    if not fp.is_file():
        return None
    return {e["relpath"]: e["md5"] for e in json.loads(fp.read_text(encoding="utf-8"))}


def lock_out_md5s(lock_fp: Path, outs: dict[str, tuple[str, str]]) -> dict[str, str]:
    """The md5s ``dvc.lock`` recorded for some outputs: ``{tag: (stage, path)}`` -> ``{tag: md5}`` (empty when the
    run is not under DVC, e.g. a stage called directly)."""
    if not lock_fp.exists():
        return {}
    stages = (yaml.safe_load(lock_fp.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {
        tag: o.get("md5", "")
        for tag, (stage, path) in outs.items()
        for o in stages.get(stage, {}).get("outs", [])
        if o.get("path") == path
    }


def lineage_files(lock_fp: Path, params_fp: Path) -> dict[str, str]:
    """What ``python -m pipeline reproduce`` needs, as a registered run's ``lineage/`` artifacts: the params file as
    read and ``dvc.lock`` without the ``register`` stage (that is the very run registering). Empty when not run
    under DVC. Under ``dvc repro`` the lock already holds every stage before register (DVC writes it stage by
    stage)."""
    if not lock_fp.exists():
        return {}
    lock = yaml.safe_load(lock_fp.read_text(encoding="utf-8")) or {}
    lock.get("stages", {}).pop("register", None)
    return {
        "lineage/dvc.lock": yaml.safe_dump(lock, allow_unicode=True, sort_keys=False),
        "lineage/params.yaml": params_fp.read_text(encoding="utf-8"),
    }


def export_code(home: Path, commit: str, ws: Path) -> str:
    """Put ``pipeline/`` and ``dvc.yaml`` as of git ``commit`` of ``home`` into ``ws``; returns where they came from.

    A commit marked ``-dirty`` or absent from ``home`` falls back to ``home``'s working tree; either way
    ``dvc.lock``'s md5s of the code decide whether it is the code that ran.
    """
    import io
    import tarfile

    sha = commit.removesuffix("-dirty")
    known = subprocess.run(["git", "-C", str(home), "cat-file", "-e", f"{sha}^{{commit}}"], capture_output=True)
    if commit.endswith("-dirty") or known.returncode != 0:
        _sync_tree(home / "pipeline", ws / "pipeline")
        shutil.copy2(home / "dvc.yaml", ws / "dvc.yaml")
        why = "had uncommitted code" if commit.endswith("-dirty") else "is not in this repository"
        return f"the working tree of {home} (git commit {commit or '?'} {why})"
    archive = subprocess.run(
        ["git", "-C", str(home), "archive", "--format=tar", sha, "pipeline", "dvc.yaml"],
        capture_output=True,
        check=True,
    ).stdout
    if (ws / "pipeline").exists():
        shutil.rmtree(ws / "pipeline")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(ws, filter="data")
    return f"git commit {sha[:12]} of {home}"


def default_model_uri() -> str:
    """``models:/<name>@champion``: ``PIPELINE_MODEL_NAME``, else ``registry.model_name`` of the profile in
    ``PIPELINE_PROFILE`` (the committed params.yaml when unset): the one source of the registered model's name."""
    name = settings.model_name()
    if not name:
        params = merged_params(project_home(), settings.profile(), {})
        name = config_from_dict(params).registry.model_name
    return f"models:/{name}@champion"
