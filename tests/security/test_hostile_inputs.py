"""Hostile inputs (docs: issue 32's findings): what an uploader or an engineer account controls never reaches a
shell, a page or a decoder it should not. Each test was seen failing on the code before its fix (18ef2e3)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, Image

from pipeline.adapters.profiles import form_overrides, merged_params
from pipeline.adapters.storage import ObjectInfo
from pipeline.core.config import config_from_dict
from pipeline.core.errors import ConfigError
from pipeline.core.images import check_decode, decode_rgb, read_header
from pipeline.stages.ingest import _describe

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parents[2]
SCRIPT_NAME = "<img src=x onerror=alert(document.cookie)>.png"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"


@pytest.mark.parametrize(
    "override",
    [
        ["bag.seeds=['0;touch PWNED;#']"],  # finding 1: DVC pastes ${item} into the train command
        ['bag.seeds=["$(touch PWNED)"]'],
        ["backbones.x;touch PWNED2;#={}"],  # ... and ${key} into the backbone command
    ],
)
def test_a_trigger_form_cannot_put_shell_syntax_into_a_stage_command(override):
    with pytest.raises(ConfigError) as err:
        merged_params(ROOT, "cpu-demo", form_overrides({"landing_uri": "s3://landing/elpv/", "set": override}))
    assert "bag.seeds" in str(err.value) or "backbones" in str(err.value)


def test_plain_seeds_and_timm_names_still_pass():
    cfg = config_from_dict(
        merged_params(
            ROOT,
            "cpu-demo",
            form_overrides(
                {"landing_uri": "s3://landing/elpv/", "set": ["bag.seeds=[3,4,5]", "backbones.efficientnet_lite1={}"]}
            ),
        )
    )
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
    for write in (
        lambda: pio.write_text_atomic(tmp_path / "a.json", "{}"),
        lambda: pio.write_csv(tmp_path / "a.csv", [{"x": 1}], ["x"]),
        lambda: pio.save_npy_atomic(tmp_path / "a.npy", np.zeros(3)),
    ):
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


class _Planted:
    """Unpickling this touches ``marker``: what a crafted ``python_model.pkl`` could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_planted_pickle_in_a_registered_model_never_runs(tmp_path, local_registry):
    """Finding 3: an engineer logs a pyfunc whose pickle runs code, registers it and moves ``champion`` (or passes
    its URI to the batch DAG). Batch prediction and the gate load the bag from its files: the pickle never runs."""
    import json

    import mlflow
    import numpy as np
    import timm
    import torch
    from mlflow.pyfunc import PythonModel

    from pipeline.adapters.serving import encode_image_file
    from pipeline.commands.predict import load_model
    from pipeline.core import checkpoints
    from pipeline.stages.register import score_version

    marker = tmp_path / "PWNED"

    class Hostile(PythonModel):
        def __reduce__(self):
            return _Planted(marker).__reduce__()

        def predict(self, context, model_input, params=None):
            return model_input

    torch.manual_seed(0)
    member = tmp_path / "member_0"
    sha = checkpoints.save(timm.create_model("test_efficientnet", num_classes=2).state_dict(), member / "model.pt")
    (member / "meta.json").write_text(
        json.dumps(
            {
                "backbone": "test_efficientnet",
                "img_size": 32,
                "class_names": ["a", "b"],
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
                "model_sha256": sha,
            }
        )
    )
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="bag", python_model=Hostile(), artifacts={"member_0": str(member)}, pip_requirements=["torch"]
        )
    version = mlflow.register_model(info.model_uri, "victim").version
    mlflow.MlflowClient().set_registered_model_alias("victim", "champion", version)
    marker.unlink(missing_ok=True)  # logging may have loaded it (on the attacker's side)

    loaded = load_model("models:/victim@champion")
    Image.new("RGB", (40, 40), (9, 99, 200)).save(tmp_path / "x.png")
    import pandas as pd

    labels = score_version("victim", version, pd.DataFrame({"image": [encode_image_file(tmp_path / "x.png")]}), "cpu")
    probs = loaded.predictor.predict_proba([Image.open(tmp_path / "x.png").convert("RGB")])
    assert not marker.exists(), "loading the registered model ran its pickle"
    assert loaded.version == str(version) and labels[0] in ("a", "b") and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    with pytest.raises(Exception):  # the same package through MLflow's own loader does run it: the test can fail
        mlflow.pyfunc.load_model(f"models:/victim/{version}")
    assert marker.exists()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    import importlib.util
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    spec = importlib.util.spec_from_file_location("defect_models_hostile", ROOT / "plugins" / "defect_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_docs_run_sandboxed_off_airflows_origin(plugin, tmp_path, monkeypatch):
    """Finding 2: Data Docs (which print what validate found in uploads) were served from Airflow's origin with
    their scripts: a script there acts with the operator's Airflow session. Now an opaque-origin sandbox."""
    from fastapi.testclient import TestClient

    page = tmp_path / "index.html"
    page.write_text("<html><script>fetch('/api/v2/variables')</script></html>")
    monkeypatch.setattr(plugin, "_validation_file", lambda dag_id, run_id, rel: page)
    for dep in plugin.app.router.dependencies:  # Airflow's login is tested against a real api-server elsewhere
        monkeypatch.setitem(plugin.app.dependency_overrides, dep.dependency, lambda: None)
    resp = TestClient(plugin.app).get("/validation/defect_training/r1/data_docs/index.html")
    assert resp.status_code == 200 and "<script>" in resp.text
    csp = [d.strip() for d in resp.headers.get("content-security-policy", "").split(";")]
    assert csp[0].startswith("sandbox") and "allow-same-origin" not in csp[0] and "allow-scripts" not in csp[0], csp
    assert "script-src 'none'" in csp and "connect-src 'none'" in csp and "form-action 'none'" in csp
    assert resp.headers.get("x-content-type-options") == "nosniff"


def test_the_archive_cache_is_private_and_refuses_a_planted_folder(plugin, tmp_path, monkeypatch):
    """Finding 13: the copies fetched from MLflow were cached in a predictable world-writable /tmp path."""
    import os
    import stat
    import tempfile

    from fastapi import HTTPException

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = plugin.archive_cache()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and root.stat().st_uid == os.getuid()
    root.chmod(0o777)  # as if another user had made it first
    with pytest.raises(HTTPException):
        plugin.archive_cache()
    with pytest.raises(HTTPException):
        plugin._archived("../../etc", "quarantine.csv", None)


def test_registry_searches_match_names_with_quotes_and_backslashes_exactly(local_registry):
    """Finding 12: filters were pasted unquoted (a ``'`` broke or widened the search) or escaped with a backslash
    MLflow keeps (such values never matched). A run id or model name now matches itself and nothing else."""
    import mlflow

    from pipeline.adapters import tracking

    odd = "manual__it's \\ 'x' or '1'='1"
    for run_id in (odd, "manual__plain"):
        with mlflow.start_run(tags={"airflow_dag_id": "defect_training", "airflow_run_id": run_id}):
            pass
    found = tracking.runs_of_dag_run("defect_training", odd)
    assert [r.data.tags["airflow_run_id"] for r in found] == [odd]
    client = mlflow.MlflowClient()
    for name in ("it's", "plain"):
        client.create_registered_model(name)
        client.create_model_version(name, "file:///nowhere", tags={"candidate_id": name})
    assert [v.name for v in tracking.versions_tagged("it's", "candidate_id", "it's")] == ["it's"]
    assert tracking.version_by_candidate(client, "it's", "it's").name == "it's"
    with pytest.raises(Exception, match="both quote characters"):
        tracking.runs_of_dag_run("defect_training", "a'b\"c")


def test_prediction_batches_hold_a_bounded_number_of_decoded_pixels():
    """Finding 10: 32 single-colour PNGs of 40 MP each pass every per-file limit (a few hundred KB each) and one
    batch held them all decoded (~3.8 GB): the batch worker was OOM-killed, retried, killed again."""
    from pipeline.commands.predict import BATCH_PIXELS, Item, batches
    from pipeline.core.config import MAX_PIXELS

    buf = io.BytesIO()
    Image.new("RGB", (5000, 5000), (200, 10, 10)).save(buf, "PNG")  # 25 MP, 70 KB
    huge = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    small = buf.getvalue()
    items = [Item(f"{i}.png", (lambda b=b: b)) for i, b in enumerate([huge] * 6 + [small] * 40 + [b"junk"])]
    seen = []
    for batch in batches(items, batch_size=32):
        pixels = sum(im.width * im.height for _, im, _ in batch if im is not None)
        assert len(batch) <= 32 and (pixels <= BATCH_PIXELS or len(batch) == 1), (len(batch), pixels)
        seen += [(item.id, err) for item, _, err in batch]
    assert [i for i, _ in seen] == [item.id for item in items]  # every photo once, in order
    assert seen[-1][1] and not any(err for _, err in seen[:-1])  # the junk file is an error row, not a stop
    assert BATCH_PIXELS < 32 * MAX_PIXELS


def test_seaweedfs_filer_and_volume_ports_refuse_requests_without_the_s3_keys(stack, s3):
    """Finding 6: the filer's HTTP port served and took every object around the S3 keys (any local process, or a
    web page's cross-origin request). With the stack's security.toml (JWT signing) it refuses them; S3 still works."""
    import urllib.error
    import urllib.request

    s3.put_object(Bucket="landing", Key="hostile/secret.png", Body=b"a labelled photo")
    filer = f"http://127.0.0.1:{stack.s3_port + 3}"

    def status(url: str, method: str = "GET", data: bytes | None = None) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(f"{filer}/buckets/landing/hostile/secret.png") == 401
    assert status(f"{filer}/buckets/landing/hostile/planted.png", "PUT", b"x") == 401
    assert status(f"{filer}/buckets/mlflow/?pretty=y") == 401
    assert s3.get_object(Bucket="landing", Key="hostile/secret.png")["Body"].read() == b"a labelled photo"
    assert oct((stack.root / "security.toml").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    "override, key",
    [
        ("registry.f1_floor=0", "registry.f1_floor"),  # the gate is the service account's rule
        ("registry.confidence=0", "registry.confidence"),
        ("registry.min_test_images=1", "registry.min_test_images"),
        ("validate.max_pixels=10000000000", "validate.max_pixels"),  # the decompression-bomb guard
        ("data.landing_uri=s3://dvc/", "data.landing_uri"),  # its own Param, checked by its pattern
    ],
)
def test_a_trigger_may_change_how_a_model_trains_not_the_gate_or_the_guards(override, key):
    with pytest.raises(ConfigError, match=f"set: {key} cannot be changed from a trigger"):
        form_overrides({"landing_uri": "s3://landing/elpv/", "set": [override]})
    ok = form_overrides(
        {
            "landing_uri": "s3://landing/elpv/",
            "set": [
                "train.epochs=3",
                "bag.folds=false",
                "backbones.efficientnet_lite1={}",
                "registry.model_name=dacon-shaped",
            ],
        }
    )
    assert ok["train"]["epochs"] == 3 and "efficientnet_lite1" in ok["backbones"]


def _chromium() -> str:
    import os
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail("chromium is missing (scripts/install-system-deps.sh installs Debian's package)", pytrace=False)
    pytest.skip("chromium is not installed (make system-deps)")


def test_a_script_in_an_uploaded_file_name_never_runs_in_data_docs(plugin, tmp_path, monkeypatch):
    """Finding 2, end to end in a real browser: an uploader lands ``cls/<img … onerror=…>.png`` holding no image;
    validate's GX suite quarantines it and writes Data Docs; the plugin serves them over HTTP; headless Chromium
    renders every page. Two layers, each checked: the payload never becomes an element (decode reasons carry no
    name and no '<'), and no script runs on these pages at all (the plugin's CSP), which would mark the page."""
    import socket
    import subprocess
    import threading
    import time

    import uvicorn

    from pipeline.stages.validate import decode_table, run_expectations

    chromium = _chromium()
    payload = "<img src=x onerror=document.body.dataset.owned=6*7*1000>.png"  # runs -> data-owned="42000"
    raw = tmp_path / "raw"
    (raw / "cls").mkdir(parents=True)
    (raw / "cls" / payload).write_bytes(b"GIF89a<svg onload=document.body.dataset.owned=6*7*1000>")
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 90, 30)).save(raw / "cls" / f"ok{i}.png")
    rows = [
        _describe(fp, f"cls/{fp.name}", "cls", ObjectInfo(f"x/cls/{fp.name}", "", fp.stat().st_size))
        for fp in sorted((raw / "cls").iterdir())
    ]
    docs = tmp_path / "docs"
    failures = run_expectations(
        config_from_dict({"data": {"landing_uri": "s3://landing/x/"}}), decode_table(raw, rows, 10**7), docs
    )
    assert len(failures) == 1, failures  # the real suite quarantined the hostile file
    pages = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.html"))
    assert any(p.startswith("validations/") for p in pages), pages

    monkeypatch.setattr(plugin, "_validation_file", lambda dag_id, run_id, rel: docs / rel)
    for dep in plugin.app.router.dependencies:
        monkeypatch.setitem(plugin.app.dependency_overrides, dep.dependency, lambda: None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(plugin.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        for page in pages:
            dom = subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}",
                    "--virtual-time-budget=3000",
                    "--dump-dom",
                    f"http://127.0.0.1:{port}/validation/defect_training/r1/data_docs/{page}",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
            assert "<body" in dom, (page, dom[:300])  # the browser rendered the page we served
            assert 'data-owned="42000"' not in dom, f"a script from an uploaded file name ran in {page}"
            assert "onerror=" not in dom.replace("onerror=document", ""), f"the payload became markup in {page}"
            if page.startswith("validations/"):
                assert "decode_error" in dom and "Unsuccessful Expectations" in dom  # readable without script
    finally:
        server.should_exit = True
        thread.join(10)


def _frames(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 40), (i * 80, 20, 20)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _text_bomb() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * (50 * 1024 * 1024), zip=True)  # 50 MB of text in ~50 KB
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_hostile_keys_and_containers_each_get_a_reason_and_the_run_goes_on(s3, tmp_path):
    """Beyond the findings: what an uploader can do with S3 keys (1,024 bytes of any Unicode), the file system's
    limits and image containers. Each hostile object becomes a quarantine row with its reason; good ones stay."""
    import unicodedata

    from pipeline.core.io import read_csv
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.validate import run_validate
    from tests.integration.helpers import png_bytes

    nfc = unicodedata.normalize("NFC", "가.png")
    hostile = {  # key below the prefix -> (bytes, fragment of the reason)
        "ok/" + "가" * 83 + ".png": (png_bytes(11), "longer than 240 bytes"),  # 253 bytes + ".part" > 255
        "ok/\u202egnp.exe.png": (png_bytes(12), "U+202E"),  # right-to-left override: spoofs the name
        "o\u200bk/twin.png": (png_bytes(13), "U+200B"),  # zero-width space: a class that looks like "ok"
        "ok/line\u2028break.png": (png_bytes(14), "U+2028"),  # a line separator in CSVs and logs
        "ok/nbsp\u00a0.png": (png_bytes(15), "U+00A0"),
        "ok/multi.tif": (_frames("TIFF"), "several frames"),  # which page carries the label?
        "ok/anim.webp": (_frames("WEBP"), "several frames"),
        "ok/anim.png": (_frames("PNG"), "several frames"),  # APNG
        "ok/textbomb.png": (_text_bomb(), "Decompressed data too large"),
        "ok/icon.png": (_encode_ico(), "not an image in an accepted format"),
        "ok/page.png": (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>', "not an image"),
    }
    twins = {f"ok/{nfc}": png_bytes(17), "ok/" + unicodedata.normalize("NFD", "가.png"): png_bytes(16)}
    good = {
        "ok/%2e%2e.png": png_bytes(18),
        "ok/-rf.png": png_bytes(19),
        "ok/tail.png": png_bytes(20) + b"<html><script>alert(1)</script></html>",
    }  # a polyglot is a picture
    prefix = f"hostile-{tmp_path.name}/"
    for key, data in [*good.items(), *twins.items(), *((k, v[0]) for k, v in hostile.items())]:
        s3.put_object(Bucket="landing", Key=prefix + key, Body=data)
    cfg = config_from_dict(
        {"data": {"landing_uri": f"s3://landing/{prefix}"}, "validate": {"max_quarantine_share": 1.0}}
    )
    d = tmp_path / "data"
    run_ingest(cfg, d / "raw", d / "manifest.csv", d / "rejects.csv")
    report = run_validate(
        cfg,
        d / "raw",
        d / "manifest.csv",
        d / "rejects.csv",
        d / "validated.csv",
        d / "quarantine.csv",
        tmp_path / "validation.json",
        None,
    )
    quarantine = {r["source_key"][len(prefix) :]: r["reason"] for r in read_csv(d / "quarantine.csv")}
    for key, (_, reason) in hostile.items():
        assert reason in quarantine.get(key, ""), (key, quarantine.get(key))
    validated = {r["source_key"][len(prefix) :] for r in read_csv(d / "validated.csv")}
    kept = validated & set(twins)  # the same name in two Unicode spellings: the first listed is kept
    assert len(kept) == 1 and validated == set(good) | kept, validated
    assert "same path after NFC normalisation" in quarantine[(set(twins) - kept).pop()]
    assert report["quarantined"] == len(hostile) + 1


def _encode_ico() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="ICO")
    return buf.getvalue()


def test_rollback_moves_champion_only_to_versions_the_gate_registered(local_registry, tmp_path):
    """An engineer (EDIT on the model) may register a version by hand; `rollback` must not make it champion."""
    from mlflow import MlflowClient

    from pipeline.commands.audit import rollback
    from pipeline.core.errors import PipelineError

    client = MlflowClient()
    client.create_registered_model("victim")
    src = tmp_path / "model"
    src.mkdir()
    v1, v2, planted = (client.create_model_version("victim", str(src)).version for _ in range(3))
    for version in (v1, v2):
        client.set_model_version_tag("victim", version, "gate", "promoted")
    client.set_registered_model_alias("victim", "champion", v2)
    with pytest.raises(PipelineError, match="not registered by the pipeline's gate"):
        rollback("victim", planted, "hostile")
    assert client.get_model_version_by_alias("victim", "champion").version == v2
    assert rollback("victim", v1, "v2 misreads stains")["champion"] == v1
    assert client.get_model_version_by_alias("victim", "champion").version == v1


def test_the_pipeline_registers_only_into_models_it_owns(local_registry, tmp_path):
    """A trigger may set registry.model_name; the service account (MLflow admin) must not then write into another
    team's model. New names are created with the owner tag; models from before the tag are adopted only when every
    version carries the gate's decision."""
    from mlflow import MlflowClient

    from pipeline.adapters.tracking import OWNER_TAG, claim_model
    from pipeline.core.errors import PipelineError

    client = MlflowClient()
    src = tmp_path / "model"
    src.mkdir()
    client.create_registered_model("other-team")
    client.create_model_version("other-team", str(src))
    with pytest.raises(PipelineError, match="belongs to no pipeline"):
        claim_model(client, "other-team", "wallpaper-defect")
    client.create_registered_model("other-experiment", tags={OWNER_TAG: "their-experiment"})
    with pytest.raises(PipelineError, match="belongs to their-experiment"):
        claim_model(client, "other-experiment", "wallpaper-defect")
    claim_model(client, "brand-new", "wallpaper-defect")
    assert client.get_registered_model("brand-new").tags[OWNER_TAG] == "wallpaper-defect"
    claim_model(client, "brand-new", "wallpaper-defect")  # ours: no error
    client.create_registered_model("empty-other")  # someone else's, no versions yet: nothing proves it is ours
    with pytest.raises(PipelineError, match="belongs to no pipeline"):
        claim_model(client, "empty-other", "wallpaper-defect")
    client.create_registered_model("legacy")
    client.set_model_version_tag("legacy", client.create_model_version("legacy", str(src)).version, "gate", "promoted")
    claim_model(client, "legacy", "wallpaper-defect")
    assert client.get_registered_model("legacy").tags[OWNER_TAG] == "wallpaper-defect"
