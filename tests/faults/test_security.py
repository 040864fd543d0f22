"""Security checks: no credential literals, only safe checkpoint loads, hostile object keys stay in the raw dir.

(S3 refusing anonymous and wrong-key requests, and loopback-only listeners of S3 and MLflow, are tested in
tests/integration/test_services.py; Airflow's listeners in tests/faults/test_arrivals.py; the compose file's
`${VAR:?}`-only credentials in tests/unit/test_compose.py.)
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.faults

# What a leaked credential looks like. Values built from ${VAR} / os.environ / placeholders are fine.
CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # a quoted literal after a secret-looking key, in code, JSON or YAML
    "secret literal": re.compile(
        r"""(?i)\b(aws_secret_access_key|secret_access_key|password|passwd|secret|api_key|token)\b["']?\s*[:=]\s*"""
        r"""["']([^"'$\s{<]{8,})["']"""
    ),
    # an unquoted value in an env file, Makefile or YAML mapping
    "secret setting": re.compile(
        r"""(?im)^\s*(export\s+)?[A-Z_]*(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY)[A-Z_]*\s*(\?=|:=|=|:)\s*"""
        r"""(?!\$)([A-Za-z0-9+/_\-.]{8,})\s*$"""
    ),
    # the stack's accounts file (devstack/accounts.py: {"pipeline": "<generated>", ...}) or Airflow's passwords file
    "account password": re.compile(r'"(pipeline|engineer|auditor|admin)\w*"\s*:\s*"[A-Za-z0-9_\-]{12,}"'),
    "URL with a password": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@$]*:(?!\$\{)[^\s/@${]{3,}@"),
}
# Placeholders in docs and comments, psql variables (:'name'), and the `gitleaks:allow` convention.
ALLOWED = re.compile(
    r"(?i)example|placeholder|your-|dummy|:(\.\.\.|password|pass|\*+)@|PASSWORD :'\w+'|"
    r"gitleaks:allow"
)


def _repo_files() -> list[Path]:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return [ROOT / f for f in out if f and (ROOT / f).is_file()]


def find_credentials(text: str) -> list[tuple[str, str]]:
    hits = []
    for name, pattern in CREDENTIAL_PATTERNS.items():
        for m in pattern.finditer(text):
            line = text[text.rfind("\n", 0, m.start()) + 1 : text.find("\n", m.end())]
            if not ALLOWED.search(line):
                hits.append((name, line.strip()[:160]))
    return hits


def test_the_scanner_catches_what_it_must():
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert find_credentials(f"aws_access_key_id = {fake_key}")
    assert find_credentials("AWS_SECRET_ACCESS_KEY: " + "wJalrXUtnFEMI" + "K7MDENG")
    assert find_credentials("export AWS_SECRET_ACCESS_KEY ?= " + "pipeline-local" + "-secret")
    assert find_credentials('password = "' + "hunter2hunter2" + '"')
    assert find_credentials("sql_alchemy_conn = postgresql://airflow:" + "s3cretpw" + "@db/airflow")
    assert not find_credentials("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}")
    assert not find_credentials('secret = os.environ["AWS_SECRET_ACCESS_KEY"]')
    assert not find_credentials('body = {"username": username, "password": password}')
    assert find_credentials("redis://:" + "Zq8xv2Lw" + "@127.0.0.1:6379/0")
    assert find_credentials('{"pipeline": "' + "KPE1JIZ4Eg-rGIQx" + '", "engineer": "x"}')  # accounts.json
    assert find_credentials('{"admin": "' + "abcdEFGH2345wxyz" + '"}')  # Airflow's generated passwords file
    assert not find_credentials('{"pipeline": "pipeline", "engineer": "engineer"}')  # accounts-roles.json


def test_the_generated_account_and_password_files_are_ignored_and_never_tracked():
    """devstack writes accounts.json, accounts-roles.json and mlflow-auth.db under PIPELINE_LOCAL (.local);
    compose's passwords come from .env. git must ignore them all, and none may be in the repository."""
    names = (
        "accounts.json",
        "accounts-roles.json",
        "mlflow-auth.db",
        ".env",
        "simple_auth_manager_passwords.json.generated",
    )
    assert not [fp for fp in _repo_files() if fp.name in names]
    paths = [".env", *(f".local/{n}" for n in names[:3]), f".local/airflow/{names[-1]}"]
    out = subprocess.run(["git", "-C", str(ROOT), "check-ignore", *paths], capture_output=True, text=True)
    assert out.stdout.split() == paths


def test_no_credential_literals_in_the_repository():
    hits = []
    for fp in _repo_files():
        if fp.suffix in (".png", ".jpg", ".npy", ".pt", ".lock") or fp.name == "constraints.txt":
            continue
        try:
            text = fp.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [(str(fp.relative_to(ROOT)), *h) for h in find_credentials(text)]
    assert not hits, "credential literals found:\n" + "\n".join(map(str, hits))


def _unsafe_loads(fp: Path) -> list[str]:
    tree = ast.parse(fp.read_text(encoding="utf-8"), filename=str(fp))
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load") or name == "load" and "weights_only" in kwargs:
            wo = kwargs.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                bad.append(f"{fp.relative_to(ROOT)}:{node.lineno} {name} without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load"):
            bad.append(f"{fp.relative_to(ROOT)}:{node.lineno} {name}")
        if name.endswith("np.load") or name.endswith("numpy.load"):
            ap = kwargs.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                bad.append(f"{fp.relative_to(ROOT)}:{node.lineno} {name} with allow_pickle")
    return bad


def test_every_checkpoint_load_is_weights_only():
    files = [fp for fp in _repo_files() if fp.suffix == ".py"]
    assert any(fp.name == "checkpoints.py" for fp in files)
    bad = [b for fp in files for b in _unsafe_loads(fp)]
    assert not bad, "\n".join(bad)


def test_the_load_scanner_catches_an_unsafe_load(tmp_path):
    probe = ROOT / "tests" / "faults" / f".probe_{tmp_path.name}.py"
    probe.write_text(
        "import torch, pickle\nx = torch.load('a.pt')\ny = torch.load('b', weights_only=False)\nz = pickle.loads(b'')\n"
    )
    try:
        assert len(_unsafe_loads(probe)) == 3
    finally:
        probe.unlink()


def test_hostile_object_keys_never_leave_the_raw_dir(s3, tmp_path):
    """Keys S3 stores but a file system must not follow: refused with a reason, nothing written outside."""
    from pipeline.core.config import config_from_dict
    from pipeline.core.io import read_csv
    from pipeline.stages.ingest import run_ingest
    from tests.integration.helpers import png_bytes

    prefix = f"hostile-{tmp_path.name}/"
    hostile = {
        "crack//etc/cron.d/x.png": "absolute",
        "crack\\..\\..\\x.png": "backslash",
        "crack/.bashrc": "hidden file",
        "crack/a\x01b.png": "unprintable character U+0001",
        "crack/./x.png": "'.'",
    }
    from botocore.exceptions import ClientError

    refused_by_server = []
    for key in hostile:
        try:
            s3.put_object(Bucket="landing", Key=prefix + key, Body=png_bytes(1))
        except ClientError:  # SeaweedFS itself refuses some of these keys
            refused_by_server.append(key)
    s3.put_object(Bucket="landing", Key=prefix + "crack/fine.png", Body=png_bytes(2))
    work = tmp_path / "work"
    cfg = config_from_dict({"data": {"landing_uri": f"s3://landing/{prefix}"}})
    run_ingest(cfg, work / "data" / "raw", work / "data" / "manifest.csv", work / "data" / "rejects.csv")
    rejects = {r["source_key"][len(prefix) :]: r["reason"] for r in read_csv(work / "data" / "rejects.csv")}
    stored = {o["Key"][len(prefix) :] for o in s3.list_objects_v2(Bucket="landing", Prefix=prefix)["Contents"]}
    # SeaweedFS refuses some keys and normalises others (`a//b` → `a/b`); every hostile key it stored is refused
    # by ingest, with the expected reason where the key reached us as written.
    stored_hostile = stored - {"crack/fine.png"}
    assert len(stored_hostile) >= 3 and set(rejects) == stored_hostile, (stored, rejects, refused_by_server)
    for key, reason in hostile.items():
        if key in stored:
            assert reason in rejects[key], (key, rejects)
    written = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    assert [w for w in written if w.startswith("data/raw/")] == ["data/raw/crack/fine.png"], written
    assert not (tmp_path / "etc").exists() and not Path("/etc/cron.d/x.png").exists()
