"""The workstation's parts without services: the profile step on params.yaml, DVC's hashes computed by us, the
lineage stored with a version, and reproduce's checks against planted differences."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.adapters.profiles import apply_profile, merged_params
from pipeline.adapters.workspace import dvc_md5
from pipeline.core.errors import ConfigError, PipelineError
from tests.conftest import ROOT

pytestmark = pytest.mark.unit
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]


@pytest.fixture()
def home(tmp_path):
    """A git checkout holding the committed params.yaml and profiles/."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    for args in (["init", "--quiet"], ["add", "--all"], ["commit", "--quiet", "-m", "recipe"]):
        subprocess.run([*GIT, *args], cwd=tmp_path, check=True, capture_output=True)
    return tmp_path


def git_diff(home: Path) -> list[str]:
    out = subprocess.run(["git", "diff", "-U0", "params.yaml"], cwd=home, capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]


def test_profile_edits_only_its_values_and_full_restores_the_recipe(home):
    changes = apply_profile(home, "test", {"train": {"lr": 0.003}})
    assert "train.epochs: 20 -> 1" in changes and "train.lr: 0.0007 -> 0.003" in changes
    diff = git_diff(home)
    # One added line for the profile key, then one -/+ pair per changed scalar; comments stay.
    assert diff[0].startswith("+profile: test  # applied by `python -m pipeline profile`")
    assert "-  epochs: 20" in diff and "+  epochs: 1" in diff and "+  lr: 0.003" in diff
    assert any("fewer duplicate groups" in ln for ln in diff if ln.startswith("+  min_class_for_split: 5"))
    assert not any("expected_classes" in ln for ln in diff)  # untouched lines stay byte for byte
    params = yaml.safe_load((home / "params.yaml").read_text())
    assert params == merged_params(home, "test", {"train": {"lr": 0.003}})
    assert list(params["backbones"]) == ["test_efficientnet", "test_resnet"]  # replaced whole, as in a workspace
    apply_profile(home, "cpu-demo")  # switching profiles starts from the recipe, not from the last profile
    assert yaml.safe_load((home / "params.yaml").read_text())["split"]["min_class_for_split"] == 10
    assert apply_profile(home, "full") == [] and git_diff(home) == []


def test_workspaces_merge_onto_the_recipe_even_where_a_profile_was_applied(home):
    apply_profile(home, "test")
    demo = merged_params(home, "cpu-demo", {})
    assert demo["split"]["min_class_for_split"] == 10 and demo["profile"] == "cpu-demo"
    shutil.rmtree(home / ".git")
    with pytest.raises(ConfigError, match=r"has profile .test. applied .* no git history .*git checkout params\.yaml"):
        merged_params(home, "cpu-demo", {})


def test_dvc_md5_is_what_dvc_records(tmp_path):
    """Our md5 of a file and of a folder (nested, Korean, '-' sorting before '/', an empty file) = DVC's own."""
    data = tmp_path / "d"
    for rel, body in {"창틀,문틀수정/x.png": b"1", "a-b/x": b"2", "a/b": b"3", "ab": b"4", "empty": b""}.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(body)
    (tmp_path / "f.csv").write_text("a,b\n1,2\n")
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "d", "f.csv"], cwd=tmp_path, check=True, capture_output=True)
    for name in ("d", "f.csv"):
        recorded = yaml.safe_load((tmp_path / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert dvc_md5(tmp_path / name) == recorded, name


def test_lineage_drops_the_register_stage_and_hashes_what_mlflow_stores(tmp_path):
    from pipeline.adapters.workspace import lineage_files
    from pipeline.core.io import text_sha256

    lock = {
        "schema": "2.0",
        "stages": {"split": {"cmd": "x", "outs": [{"path": "data/split.csv", "md5": "a"}]}, "register": {"cmd": "y"}},
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "params.yaml").write_text("profile: test  # 한국어\n", encoding="utf-8")
    files = lineage_files(tmp_path / "dvc.lock", tmp_path / "params.yaml")
    assert list(yaml.safe_load(files["lineage/dvc.lock"])["stages"]) == ["split"]
    assert files["lineage/params.yaml"] == "profile: test  # 한국어\n"
    assert (
        text_sha256(files["lineage/params.yaml"]) == hashlib.sha256((tmp_path / "params.yaml").read_bytes()).hexdigest()
    )
    assert lineage_files(tmp_path / "absent.lock", tmp_path / "params.yaml") == {}


@pytest.fixture()
def ws(tmp_path):
    """A workspace and the lock that describes it exactly."""
    (tmp_path / "data" / "raw" / "crack").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "crack" / "0.png").write_bytes(b"png")
    (tmp_path / "data" / "split.csv").write_text("path,split\ncrack/0.png,train\n")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "x.py").write_text("X = 1\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": {"seed": 42}, "bag": {"bootstrap": True}}))
    lock = {
        "split": {
            "deps": [
                {"path": "pipeline/x.py", "md5": dvc_md5(tmp_path / "pipeline/x.py")},
                {"path": "data/raw", "md5": dvc_md5(tmp_path / "data/raw")},
            ],
            "params": {"params.yaml": {"split": {"seed": 42}, "bag.bootstrap": True}},
            "outs": [{"path": "data/split.csv", "md5": dvc_md5(tmp_path / "data/split.csv")}],
        }
    }
    return tmp_path, lock


def test_reproduce_checks_pass_on_the_recorded_workspace(ws):
    from pipeline.commands.reproduce import file_checks, param_checks

    root, lock = ws
    checks = [*param_checks(root, lock), *file_checks(root, lock)]
    assert all(c.ok for c in checks) and [c.what for c in checks] == ["params", "code", "data/raw", "data/split.csv"]


@pytest.mark.parametrize(
    "plant,what",
    [
        (lambda r: (r / "data/raw/crack/0.png").write_bytes(b"PNG"), "data/raw"),
        (lambda r: (r / "data/raw/crack/1.png").write_bytes(b"new"), "data/raw"),
        (lambda r: (r / "data/split.csv").unlink(), "data/split.csv"),
        (lambda r: (r / "pipeline/x.py").write_text("X = 2\n"), "code"),
        (
            lambda r: (r / "params.yaml").write_text(
                yaml.safe_dump({"split": {"seed": 7}, "bag": {"bootstrap": True}})
            ),
            "params",
        ),
    ],
)
def test_reproduce_names_what_differs(ws, plant, what):
    from pipeline.commands.reproduce import file_checks, param_checks, report

    root, lock = ws
    plant(root)
    checks = [*param_checks(root, lock), *file_checks(root, lock)]
    assert [c.what for c in checks if not c.ok] == [what]
    with pytest.raises(PipelineError, match=rf"^v1 does not reproduce: {what}: ") as exc:
        report(checks, "v1")
    assert "\n" not in str(exc.value)


def test_reproduce_refuses_a_version_without_stored_lineage():
    from pipeline.commands.reproduce import fetch_lineage

    with pytest.raises(PipelineError, match="v3 has no dvc_lock_sha256 tag"):
        fetch_lineage("run", {"weighted_f1": "0.5"}, "v3")


def test_committed_dvc_config_names_the_default_remote_and_nothing_machine_bound():
    import configparser

    from pipeline.adapters.workspace import DEFAULT_REMOTE

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    assert cfg["core"]["remote"] == "store" and cfg["'remote \"store\"'"]["url"] == DEFAULT_REMOTE
    assert set(cfg["'remote \"store\"'"]) == {"url"}  # endpoint and keys come from the environment or config.local
    assert "/config.local" in (ROOT / ".dvc" / ".gitignore").read_text().split()
