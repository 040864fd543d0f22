"""A registered version's exact inputs back in a DVC workspace, every hash checked; optionally retrained.

    python -m pipeline reproduce --model NAME --version N [--dir DIR] [--retrain [--tolerance T]]

1. From MLflow: the version's tags and its run's ``lineage/params.yaml`` and ``lineage/dvc.lock`` (stored by
   ``register``), each checked against its SHA-256 tag.
2. Into ``DIR`` (default ``.local/reproduce/<model>-v<N>``): ``pipeline/`` and ``dvc.yaml`` of the version's git
   commit (``git archive``; this checkout's files when the commit is not here), that params.yaml and that lock.
3. ``dvc pull`` of every stage in the lock from the DVC remote (``store``).
4. Checks, each printed: the params the lock recorded, the md5 of every code file, data file and output in the
   lock, the version's lineage tags (data md5s, fingerprint, params hash, weighted F1) and the SHA-256 of each bag
   member's weights; then ``dvc status``. The first failing group ends the command with one line naming what
   differs (exit 2).

``--retrain`` then runs every stage but ``ingest`` and ``label_exclusions`` again (``dvc repro --force
--single-item``; they would read today's bucket and today's champion instead of the version's data and exclusion
list, and ``register`` is never run) and prints the new weighted F1
beside the registered one. On the CPU the test and demo profiles retrain bit for bit (same weights, same F1);
on a GPU, cuDNN and bf16 kernels are not deterministic, so pass ``--tolerance`` (see docs/GUIDE.md, "Reproduce a registered version").
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.adapters import profiles, tracking, workspace
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import sha256_file

# Stages that read the outside world as it is now (the bucket, the registry's champion): a retrain keeps their
# pulled outputs, which are the version's.
LIVE_STAGES = ("ingest", "label_exclusions")
MARKER = ".reproduce.json"  # marks a folder this command made, so a second run may replace it whole


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    detail: str


def default_dir(name: str, version: str) -> Path:
    return workspace.default_workspace().parent / "reproduce" / f"{name}-v{version}"


def run_reproduce(name: str, version: str, ws: Path | None, retrain: bool, tolerance: float = 0.0) -> int:
    mv = tracking.get_version(name, version)
    tags = dict(mv.tags)
    label = f"{name} v{mv.version}"
    ws = (ws or default_dir(name, mv.version)).resolve()
    print(f"reproducing {label} (run {mv.run_id}, git {tags.get('git_commit', '?')}) in {ws}")
    lock_text, params_text = fetch_lineage(mv.run_id, tags, label)
    lock = yaml.safe_load(lock_text)["stages"]
    source = prepare(ws, label, tags.get("git_commit", ""), lock_text, params_text)
    print(f"  code from {source}")
    pull(ws, list(lock), label, lock)
    checks = lineage_checks(tags, ws)
    checks += [*param_checks(ws, lock), *file_checks(ws, lock), *tag_checks(ws, lock, tags)]
    checks.append(status_check(ws, list(lock)))
    report(checks, label)
    print(f"verified {len(checks)} checks: {ws} holds the params, code, data and weights of {label}")
    if retrain:
        return retrain_and_compare(ws, lock, tags, label, tolerance)
    return 0


def fetch_lineage(run_id: str, tags: dict, label: str) -> tuple[str, str]:
    """The stored lock and params file, refused unless their SHA-256 equals the version's tags."""
    if "dvc_lock_sha256" not in tags:
        raise PipelineError(
            f"{label} has no dvc_lock_sha256 tag: it was registered outside `dvc repro` or before "
            "lineage was stored with versions, so there is no lock to reproduce it from"
        )
    with tempfile.TemporaryDirectory() as tmp:
        texts = {}
        for fname, tag in (("dvc.lock", "dvc_lock_sha256"), ("params.yaml", "params_sha256")):
            fp = tracking.download_artifact(run_id, f"lineage/{fname}", Path(tmp))
            if sha256_file(fp) != tags.get(tag):
                raise PipelineError(
                    f"{label}: lineage/{fname} of run {run_id} has SHA-256 {sha256_file(fp)[:16]}…, "
                    f"tag {tag} says {tags.get(tag, '(none)')[:16]}…: the stored file was altered"
                )
            texts[fname] = fp.read_text(encoding="utf-8")
    return texts["dvc.lock"], texts["params.yaml"]


def prepare(ws: Path, label: str, commit: str, lock_text: str, params_text: str) -> str:
    """A new folder (or one an earlier reproduce made) → DVC workspace with the version's code, params and lock."""
    if ws.exists() and any(ws.iterdir()) and not (ws / MARKER).exists():
        raise PipelineError(f"{ws} is not empty and was not made by `reproduce`; choose another --dir")
    if ws.exists():  # never reuse an earlier cache: DVC trusts its cache, and it may hold what was refused
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    source = workspace.export_code(workspace.project_home(), commit, ws)
    (ws / "params.yaml").write_text(params_text, encoding="utf-8")
    (ws / "dvc.lock").write_text(lock_text, encoding="utf-8")
    (ws / MARKER).write_text(json.dumps({"version": label}) + "\n", encoding="utf-8")
    workspace.init_dvc(ws)
    return source


def pull(ws: Path, stages: list[str], label: str, lock: dict) -> None:
    """``dvc pull`` of the lock's stages; objects the remote lacks end it with one line naming their paths."""
    proc = workspace.dvc(ws, "pull", *stages, check=False)
    if proc.returncode == 0:
        return
    out = proc.stdout + proc.stderr
    found = re.findall(r"failed to transfer '([0-9a-f]{32})'|md5: ([0-9a-f]{32})", out)  # DVC words it two ways
    missing = sorted({a or b for a, b in found})
    if not missing:
        raise PipelineError(f"{label}: `dvc pull` failed in {ws}: {out.strip().splitlines()[-1]}")
    workspace.dvc(ws, "checkout", *stages, check=False)  # what did arrive, so the rest can be named
    where = locate(ws, lock, missing)
    raise PipelineError(
        f"{label}: the DVC remote {workspace.remote_url()} lacks {len(missing)} object(s) of "
        f"{', '.join(where[:4]) or 'its outputs'}{' …' if len(where) > 4 else ''} (md5 "
        f"{', '.join(m[:12] for m in missing[:4])}); `dvc push` them from the workspace that trained it"
    )


def locate(ws: Path, lock: dict, md5s: list[str]) -> list[str]:
    """The outputs that carry these md5s: a file itself, a file inside a folder whose listing was pulled, or else
    every output the pull could not check out."""
    found = []
    for stage in lock.values():
        for out in stage.get("outs", []):
            if out["md5"] in md5s:
                found.append(out["path"])
            listing = workspace.dvc_dir_listing(ws, out["md5"]) if out["md5"].endswith(".dir") else None
            found += [f"{out['path']}/{rel}" for rel, m in (listing or {}).items() if m in md5s]
    absent = [o["path"] for st in lock.values() for o in st.get("outs", []) if not (ws / o["path"]).exists()]
    return sorted(set(found or absent))


def lineage_checks(tags: dict, ws: Path) -> list[Check]:
    """The stored files (checked by :func:`fetch_lineage`) and the params hash of the config they give."""
    cfg = load_config(ws / "params.yaml")
    return [
        Check(True, "dvc.lock", f"sha256 {tags['dvc_lock_sha256'][:16]}… = tag dvc_lock_sha256"),
        Check(True, "params.yaml", f"sha256 {tags['params_sha256'][:16]}… = tag params_sha256"),
        Check(
            cfg.params_hash() == tags.get("params_hash"),
            "params hash",
            f"{cfg.params_hash()} {'=' if cfg.params_hash() == tags.get('params_hash') else '≠'} tag "
            f"params_hash {tags.get('params_hash')}",
        ),
    ]


def _dotted(params: dict, key: str):
    node = params
    for part in key.split("."):
        node = node[part]
    return node


def param_checks(ws: Path, lock: dict) -> list[Check]:
    """Each stage's params as the lock recorded them = the values in params.yaml."""
    params = yaml.safe_load((ws / "params.yaml").read_text(encoding="utf-8"))
    recorded = {}
    for stage in lock.values():
        recorded.update(profiles.flatten(stage.get("params", {}).get("params.yaml", {})))
    bad = []
    for key, value in recorded.items():
        try:
            if _dotted(params, key) != value:
                bad.append(f"{key} = {_dotted(params, key)!r}, dvc.lock {value!r}")
        except (KeyError, TypeError):
            bad.append(f"{key} missing, dvc.lock {value!r}")
    return [Check(not bad, "params", bad[0] if bad else f"{len(recorded)} values in params.yaml = dvc.lock")]


def file_checks(ws: Path, lock: dict) -> list[Check]:
    """md5 of every dep and out the lock names (code summed up in one line, data and outputs one line each)."""
    entries: dict[str, str] = {}
    for stage in lock.values():
        for item in [*stage.get("deps", []), *stage.get("outs", [])]:
            entries[item["path"]] = item["md5"]
    code = {p: m for p, m in entries.items() if p.startswith("pipeline/")}
    bad_code = [p for p, m in sorted(code.items()) if not (ws / p).is_file() or workspace.dvc_md5(ws / p) != m]
    checks = [
        Check(
            not bad_code,
            "code",
            f"{bad_code[0]} differs from the code dvc.lock recorded"
            if bad_code
            else f"{len(code)} files under pipeline/, md5 = dvc.lock",
        )
    ]
    for path, md5 in sorted(entries.items()):
        if path in code:
            continue
        if not (ws / path).exists():
            checks.append(Check(False, path, f"missing (dvc.lock md5 {md5})"))
            continue
        got = workspace.dvc_md5(ws / path)
        checks.append(
            Check(
                got == md5,
                path,
                f"md5 {_short(md5)} = dvc.lock"
                if got == md5
                else f"md5 {_short(got)} ≠ dvc.lock {_short(md5)}" + _inside(ws, path, md5),
            )
        )
    return checks


def _inside(ws: Path, path: str, md5: str) -> str:
    """`` (a, b differ)`` for a folder whose recorded listing is in the cache, else nothing."""
    if not md5.endswith(".dir") or workspace.dvc_dir_listing(ws, md5) is None:
        return ""
    return f" ({', '.join(differing_files(ws, path, md5)[:3])} differ)"


def _short(md5: str) -> str:
    return f"{md5[:12]}…{'.dir' if md5.endswith('.dir') else ''}"


def tag_checks(ws: Path, lock: dict, tags: dict) -> list[Check]:
    """The version's lineage tags against the pulled files."""

    def out_md5(stage: str, path: str) -> str:
        return next((o["md5"] for o in lock.get(stage, {}).get("outs", []) if o["path"] == path), "")

    validation = json.loads((ws / "reports/validation.json").read_text(encoding="utf-8"))
    metrics = json.loads((ws / "metrics/eval.json").read_text(encoding="utf-8"))
    pairs = [
        ("dvc_data_md5", out_md5("ingest", "data/raw")),
        ("dvc_split_md5", out_md5("split", "data/split.csv")),
        ("data_fingerprint", validation["fingerprint"]),
        ("weighted_f1", f"{metrics['weighted_f1']:.6f}"),
    ]
    checks = []
    for tag, got in pairs:
        want = tags.get(tag, "")
        checks.append(
            Check(
                bool(want) and want == got,
                f"tag {tag}",
                f"{want[:16]}{'…' if len(want) > 16 else ''} = the workspace's"
                if want == got
                else f"{want or '(missing)'} ≠ {got} in the workspace",
            )
        )
    weights = json.loads(tags.get("weights_sha256", "{}"))
    if not weights:
        checks.append(Check(False, "tag weights_sha256", "missing: the version does not name its weights"))
    for member, sha in sorted(weights.items()):
        fp = ws / "models" / member / "model.pt"
        got = sha256_file(fp) if fp.is_file() else "(missing)"
        checks.append(
            Check(
                got == sha,
                f"models/{member}/model.pt",
                f"sha256 {got[:16]}… {'=' if got == sha else '≠'} tag weights_sha256 {sha[:16]}…",
            )
        )
    return checks


def status_check(ws: Path, stages: list[str]) -> Check:
    """DVC's own word: every stage of the lock up to date (``ingest`` is always re-run: it lists the bucket)."""
    proc = workspace.dvc(ws, "status", "--json", *stages, check=False)
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        return Check(False, "dvc status", (proc.stdout + proc.stderr).strip()[-300:])
    changed = {k: v for k, v in status.items() if v != ["always changed"]}
    return Check(not changed, "dvc status", f"{changed}" if changed else f"{len(stages)} stages up to date")


def report(checks: list[Check], label: str) -> None:
    """Print every check; raise one line for the first failure (naming how many more failed)."""
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'}  {c.what:<34} {c.detail}")
    failed = sorted((c for c in checks if not c.ok), key=lambda c: -c.what.count("/"))  # the most specific first
    if failed:
        more = f" (and {len(failed) - 1} more: {', '.join(c.what for c in failed[1:4])})" if len(failed) > 1 else ""
        raise PipelineError(f"{label} does not reproduce: {failed[0].what}: {failed[0].detail}{more}")


def differing_files(ws: Path, path: str, md5: str) -> list[str]:
    """Files of output ``path`` whose md5 differs from the registered folder's listing (the whole path for a file)."""
    listing = workspace.dvc_dir_listing(ws, md5) if md5.endswith(".dir") else None
    if listing is None:
        return [path]
    now = {p.relative_to(ws / path).as_posix(): workspace.dvc_md5(p) for p in (ws / path).rglob("*") if p.is_file()}
    return sorted(rel for rel in set(listing) | set(now) if listing.get(rel) != now.get(rel))


def retrain_and_compare(ws: Path, lock: dict, tags: dict, label: str, tolerance: float) -> int:
    """Every stage but the live ones again, forced; the new weighted F1 and weights beside the registered ones."""
    before = json.loads((ws / "metrics/eval.json").read_text(encoding="utf-8"))["weighted_f1"]
    stages = [s for s in lock if s not in LIVE_STAGES]
    print(f"retraining: dvc repro --force --single-item {' → '.join(stages)}")
    for stage in stages:
        workspace.run_stage(ws, stage, force=True)
    after = json.loads((ws / "metrics/eval.json").read_text(encoding="utf-8"))["weighted_f1"]
    print(f"weighted F1  registered {before:.6f}  retrained {after:.6f}  difference {after - before:+.6f}")
    outs = {o["path"]: o["md5"] for s in stages for o in lock[s].get("outs", [])}
    same = [p for p, m in outs.items() if workspace.dvc_md5(ws / p) == m]
    print(f"outputs identical to the registered ones: {len(same)} of {len(outs)}")
    for path in sorted(set(outs) - set(same)):
        print(f"  {path} differs in: {', '.join(differing_files(ws, path, outs[path]))}")
    for member, sha in sorted(json.loads(tags.get("weights_sha256", "{}")).items()):
        got = sha256_file(ws / "models" / member / "model.pt")
        print(f"weights {member}: {'bit-identical' if got == sha else 'differ'} (sha256 {got[:16]}…)")
    if abs(after - before) > tolerance:
        raise PipelineError(
            f"{label}: retrained weighted F1 {after:.6f} differs from the registered {before:.6f} by "
            f"{abs(after - before):.6f} > --tolerance {tolerance}"
        )
    return 0
