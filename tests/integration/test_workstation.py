"""The workstation: `dvc repro` in a fresh clone's own root, and a registered version reproduced from its lineage.

A "fresh clone" is this working tree's files (tracked, and untracked but not ignored) committed into a new git
repository: what `git clone` of this commit gives. In it, with the private stack: the profile step, `dvc repro`
(registers version A), `dvc push`, `dvc exp run -S` (a second, different version B), `dvc exp show`; then
`python -m pipeline reproduce` of A verifies every hash and `--retrain` gives the same weighted F1 from
bit-identical weights; a damaged remote object gives one clear line. The tests run in file order and share the
clone. Their own model name and DVC remote prefix keep them apart from the DAG tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import GOOD_TINY_RECIPE, ROOT, run_cli
from tests.integration.helpers import upload_tiny_dataset

pytestmark = pytest.mark.integration

MODEL_WS = "ws-defect-classifier"
REMOTE = "s3://dvc/ws-test-cache"
LANDING = "s3://landing/ws-tiny/"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def fresh_clone(dst):
    """The working tree's committable files in a new git repository with one commit."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for args in (["init", "--quiet"], ["add", "--all"], ["commit", "--quiet", "-m", "clone"]):
        subprocess.run([*git, *args], cwd=dst, check=True, capture_output=True)
    return dst


@pytest.fixture(scope="module")
def clone(stack, stack_env, tmp_path_factory):
    """(clone root, env): the clone, tiny data in the landing bucket, the clone's own home and DVC remote."""
    from pipeline.adapters import storage

    upload_tiny_dataset(storage.client(), "landing", "ws-tiny/", per_class=12)
    root = fresh_clone(tmp_path_factory.mktemp("clone"))
    return root, {**stack_env, "PIPELINE_HOME": str(root), "PIPELINE_DVC_REMOTE": REMOTE}


@pytest.fixture(scope="module")
def versions():
    return {}


def registered(name: str, version: str):
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version)


def test_dvc_repro_in_the_fresh_clone_registers_a_version(clone, versions):
    root, env = clone
    out = ok(
        run_cli(
            [
                "pipeline",
                "profile",
                "test",
                "--set",
                f"data.landing_uri={LANDING}",
                "--set",
                f"registry.model_name={MODEL_WS}",
                "--set",
                "train.epochs=3",
            ],
            env,
            cwd=root,
        )
    )
    assert "train.epochs: 20 -> 3" in out and f"DVC remote store: {REMOTE}" in out
    assert f"dvc.lock: none yet: no version of {MODEL_WS} was trained on these params" in out
    local = (root / ".dvc" / "config.local").read_text()
    assert REMOTE in local and env["AWS_ENDPOINT_URL"] in local and env["AWS_SECRET_ACCESS_KEY"] not in local
    ok(run_cli(["dvc", "repro"], env, cwd=root))
    ok(run_cli(["dvc", "push"], env, cwd=root))
    decision = json.loads((root / "registry" / "decision.json").read_text())
    version = registered(MODEL_WS, decision["model_version"])
    versions["A"] = version.version
    tags = version.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    # The profile edits params.yaml only: the code is the commit's (no "-dirty"), the commit keeps the recipe.
    assert tags["git_commit"] == head and tags["profile"] == "test"
    assert subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
    ).stdout.split() == ["M", "params.yaml"]
    assert "profile" not in yaml.safe_load(
        subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True).stdout
    )
    assert json.loads(tags["weights_sha256"]) == {"member_0": sha256(root / "models/member_0/model.pt")}
    assert tags["params_sha256"] == sha256(root / "params.yaml")
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    raw_md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert tags["dvc_data_md5"] == raw_md5 and tags["dvc_lock_sha256"]
    status = json.loads(ok(run_cli(["dvc", "status", "--json"], env, cwd=root)))
    # ingest re-lists the bucket, label_exclusions re-reads the champion; the rest is up to date
    assert status == {"ingest": ["always changed"], "label_exclusions": ["always changed"]}, status


def test_exp_run_registers_a_second_version_and_exp_show_compares(clone, versions):
    root, env = clone
    ok(run_cli(["dvc", "exp", "run", "-S", "bag.bootstrap=false"], env, cwd=root))
    ok(run_cli(["dvc", "push"], env, cwd=root))
    decision = json.loads((root / "registry" / "decision.json").read_text())
    versions["B"] = decision["model_version"]
    assert versions["B"] != versions["A"]
    b = registered(MODEL_WS, versions["B"])
    assert json.loads(b.tags["weights_sha256"]) == {"member_0": sha256(root / "models/member_0/model.pt")}
    assert b.tags["params_hash"] != registered(MODEL_WS, versions["A"]).tags["params_hash"]
    shown = json.loads(ok(run_cli(["dvc", "exp", "show", "--json"], env, cwd=root)))
    exps = [e for row in shown for e in (row.get("experiments") or []) for e in e["revs"]]
    assert any(
        e["data"]["params"]["params.yaml"]["data"]["bag"]["bootstrap"] is False
        and "weighted_f1" in e["data"]["metrics"]["metrics/eval.json"]["data"]
        for e in exps
    ), shown


def test_reproduce_of_the_first_version_verifies_every_hash_and_retrains_it(clone, versions, tmp_path):
    root, env = clone
    a = registered(MODEL_WS, versions["A"])
    out = ok(
        run_cli(
            [
                "pipeline",
                "reproduce",
                "--model",
                MODEL_WS,
                "--version",
                versions["A"],
                "--dir",
                str(tmp_path / "a"),
                "--retrain",
            ],
            env,
            cwd=root,
        )
    )
    print(out)
    assert "FAIL" not in out and f"of {MODEL_WS} v{versions['A']}" in out
    assert f"code from git commit {a.tags['git_commit'][:12]}" in out
    for needle in (
        "dvc.lock ",
        "params hash ",
        "data/raw ",
        "data/split.csv ",
        "models/member_0 ",
        "tag dvc_data_md5 ",
        "tag data_fingerprint ",
        "tag weighted_f1 ",
        "dvc status ",
    ):
        assert any(line.lstrip().startswith(f"ok    {needle}") for line in out.splitlines()), needle
    sha = json.loads(a.tags["weights_sha256"])["member_0"]
    assert f"sha256 {sha[:16]}… = tag weights_sha256" in out
    # A's params, not B's (the clone's workspace now holds experiment B)
    assert yaml.safe_load((tmp_path / "a" / "params.yaml").read_text())["bag"]["bootstrap"] is True
    f1 = float(a.tags["weighted_f1"])
    assert f"weighted F1  registered {f1:.6f}  retrained {f1:.6f}  difference +0.000000" in out
    assert "weights member_0: bit-identical" in out and sha256(tmp_path / "a/models/member_0/model.pt") == sha
    # the live stages keep the version's pulled outputs: today's bucket and today's champion are not A's inputs
    retrained = next(ln for ln in out.splitlines() if ln.startswith("retraining: "))
    assert "ingest" not in retrained and "label_exclusions" not in retrained and "split" in retrained, retrained


def test_reproduce_names_a_damaged_or_missing_remote_object(clone, versions, tmp_path):
    """The member's weights altered, then deleted, in the DVC remote: one line naming what differs."""
    from pipeline.adapters import storage

    root, env = clone
    a = registered(MODEL_WS, versions["A"])
    s3 = storage.client()
    bucket, prefix = REMOTE[len("s3://") :].split("/", 1)
    listing_md5 = next(o["md5"] for o in _stored_lock(a)["stages"]["train@0"]["outs"])
    listing = json.loads(s3.get_object(Bucket=bucket, Key=_key(prefix, listing_md5))["Body"].read())
    md5 = next(e["md5"] for e in listing if e["relpath"] == "model.pt")
    key = _key(prefix, md5)
    original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(original).hexdigest() == json.loads(a.tags["weights_sha256"])["member_0"]  # tag is true
    reproduce = ["pipeline", "reproduce", "--model", MODEL_WS, "--version", versions["A"], "--dir", str(tmp_path / "r")]
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=original[:-1] + bytes([original[-1] ^ 1]))
        damaged = run_cli(reproduce, env, cwd=root)
        s3.delete_object(Bucket=bucket, Key=key)
        missing = run_cli(reproduce, env, cwd=root)
    finally:
        s3.put_object(Bucket=bucket, Key=key, Body=original)
    errors = [p.stderr.strip().splitlines()[-1] for p in (damaged, missing)]
    assert damaged.returncode == 2 and errors[0].startswith(
        f"error: {MODEL_WS} v{versions['A']} does not reproduce: models/member_0/model.pt: sha256 "
    ), errors[0]
    assert f"tag weights_sha256 {json.loads(a.tags['weights_sha256'])['member_0'][:16]}" in errors[0]
    assert missing.returncode == 2 and f"lacks 1 object(s) of models/member_0 (md5 {md5[:12]})" in errors[1], errors[1]


def _key(prefix: str, md5: str) -> str:
    return f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}"


def _stored_lock(version) -> dict:
    """The dvc.lock stored with ``version`` (its run's ``lineage/dvc.lock``)."""
    import tempfile
    from pathlib import Path

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        fp = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="lineage/dvc.lock", dst_path=tmp)
        return yaml.safe_load(Path(fp).read_text())


def test_a_fresh_clone_pulls_what_airflow_trained_and_reproduces_it(trained, stack_env, tmp_path):
    """The DAG's workspace pushes to the same remote: a clone on the same params gets the version's lock from the
    profile step, `dvc pull` fetches the DAG's outputs (nothing to retrain), and `reproduce` verifies the version."""
    from tests.integration.helpers import MODEL

    (tmp_path / "clone2").mkdir()
    root = fresh_clone(tmp_path / "clone2")
    env = {**stack_env, "PIPELINE_HOME": str(root)}
    # The DAG's params: the test profile, the tiny landing prefix and the recipe `trained` set (tests.conftest).
    sets = [x for s in ["data.landing_uri=s3://landing/tiny/", *GOOD_TINY_RECIPE] for x in ("--set", s)]
    out = ok(run_cli(["pipeline", "profile", "test", *sets], env, cwd=root))
    version = next(ln for ln in out.splitlines() if ln.startswith("dvc.lock: "))
    assert f"the one stored with {MODEL} v" in version and "(same params)" in version, out
    number = version.split(f"{MODEL} v")[1].split()[0]
    ok(run_cli(["dvc", "pull"], env, cwd=root))
    status = json.loads(ok(run_cli(["dvc", "status", "--json"], env, cwd=root)))
    # ingest and label_exclusions ask the outside world each time; register has no entry in a stored lock (it is the
    # registration)
    assert set(status) == {"ingest", "label_exclusions", "register"} and status["ingest"] == ["always changed"], status
    weights = json.loads(registered(MODEL, number).tags["weights_sha256"])
    assert weights == {"member_0": sha256(root / "models/member_0/model.pt")}  # the DAG's weights, pulled
    out = ok(
        run_cli(
            ["pipeline", "reproduce", "--model", MODEL, "--version", number, "--dir", str(tmp_path / "dag")],
            env,
            cwd=root,
        )
    )
    assert "FAIL" not in out and f"holds the params, code, data and weights of {MODEL} v{number}" in out
    assert yaml.safe_load((tmp_path / "dag" / "params.yaml").read_text())["profile"] == "test"
