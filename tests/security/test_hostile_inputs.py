"""Hostile inputs (docs: issue 32's findings): what an uploader or an engineer account controls never reaches a
shell, a page or a decoder it should not. Each test was seen failing on the code before its fix (18ef2e3)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, Image

from pipeline.adapters.profiles import form_overrides, merged_params
from pipeline.core.config import config_from_dict
from pipeline.core.errors import ConfigError
from pipeline.core.images import check_decode, decode_rgb, read_header
from pipeline.stages.ingest import _describe
from pipeline.adapters.storage import ObjectInfo

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parents[2]
SCRIPT_NAME = "<img src=x onerror=alert(document.cookie)>.png"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"


@pytest.mark.parametrize("override", [
    ["bag.seeds=['0;touch PWNED;#']"],           # finding 1: DVC pastes ${item} into the train command
    ["bag.seeds=[\"$(touch PWNED)\"]"],
    ["backbones.x;touch PWNED2;#={}"],            # ... and ${key} into the backbone command
])
def test_a_trigger_form_cannot_put_shell_syntax_into_a_stage_command(override):
    with pytest.raises(ConfigError) as err:
        merged_params(ROOT, "cpu-demo", form_overrides({"landing_uri": "s3://landing/elpv/", "set": override}))
    assert "bag.seeds" in str(err.value) or "backbones" in str(err.value)


def test_plain_seeds_and_timm_names_still_pass():
    cfg = config_from_dict(merged_params(ROOT, "cpu-demo", form_overrides(
        {"landing_uri": "s3://landing/elpv/", "set": ["bag.seeds=[3,4,5]", "backbones.efficientnet_lite1={}"]})))
    assert cfg.bag.seeds == (3, 4, 5) and "efficientnet_lite1" in cfg.backbones


def test_a_decode_error_never_carries_the_uploaded_file_name(tmp_path):
    """finding 2: PIL's error named the file; validate's quarantine reason and the Data Docs printed it."""
    fp = tmp_path / SCRIPT_NAME
    fp.write_bytes(b"not an image at all")
    row = _describe(fp, f"cls/{SCRIPT_NAME}", "cls", ObjectInfo(f"x/cls/{SCRIPT_NAME}", "", fp.stat().st_size))
    assert row["header_error"] and "<img" not in row["header_error"] and "onerror" not in row["header_error"]
    for decode in (lambda p: check_decode(p, 10**7), decode_rgb):
        with pytest.raises(ValueError) as err:
            decode(str(fp))
        assert "onerror" not in str(err.value) and str(tmp_path) not in str(err.value)
    truncated = tmp_path / "<b>x.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[:70])
    with pytest.raises(ValueError) as err:
        decode_rgb(str(truncated))
    assert "<b>" not in str(err.value)


def test_an_eps_file_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    """finding 9: without formats=, PIL tries every plugin, EPS included, and EPS loads through Ghostscript."""
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or None)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    fp = tmp_path / "cell.png"
    fp.write_bytes(EPS)
    for decode in (read_header, decode_rgb, lambda p: check_decode(p, 10**7)):
        with pytest.raises(ValueError, match="not an image in an accepted format"):
            decode(str(fp))
    with pytest.raises(ValueError):
        decode_rgb(EPS)  # serving's path: bytes from a request
    assert calls == []


def test_atomic_writers_fsync_before_the_rename(tmp_path, monkeypatch):
    """finding 14: without fsync a power cut after the rename can leave a zero-length file over a good one."""
    import os

    import numpy as np

    from pipeline.core import io as pio

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    for write in (lambda: pio.write_text_atomic(tmp_path / "a.json", "{}"),
                  lambda: pio.write_csv(tmp_path / "a.csv", [{"x": 1}], ["x"]),
                  lambda: pio.save_npy_atomic(tmp_path / "a.npy", np.zeros(3))):
        events.clear()
        write()
        assert events == ["fsync", "replace", "fsync"]  # the file's data, the rename, the folder entry


def test_the_local_stack_is_the_owners_alone(stack):
    """finding 7: .local was 0755 and the S3 volumes, mlflow.db and airflow.db 0644: any local user read them."""
    import stat

    assert stat.S_IMODE(stack.root.stat().st_mode) == 0o700
    files = [p for p in (stack.root / "s3").rglob("*") if p.is_file()]
    files += [p for p in (stack.root / "mlflow.db", Path(stack.root / "airflow" / "airflow.db")) if p.exists()]
    assert files, "the stack wrote no files to check"
    loose = [str(p) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose
