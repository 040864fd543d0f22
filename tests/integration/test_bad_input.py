"""Bad input, each as a real object in the real bucket: a named quarantine entry, a clear refusal or a
documented normalisation — never a crash, never a lost good image. The table in docs/DATA.md mirrors this file."""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.adapters import storage
from pipeline.core.config import config_from_dict
from pipeline.core.errors import StorageError, ValidationFailed
from pipeline.core.images import decode_rgb
from pipeline.core.io import read_csv
from pipeline.stages.ingest import run_ingest
from pipeline.stages.validate import run_validate
from tests.integration.helpers import png_bytes

pytestmark = pytest.mark.integration


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png() -> bytes:
    # 10,000 x 10,000 pixels (100 M > validate.max_pixels 40 M) in a few kilobytes.
    return _encode(Image.new("1", (10_000, 10_000)), "PNG", optimize=True)


NFD_CLASS = unicodedata.normalize("NFD", "곰팡이")
GOOD = {  # key below the prefix -> bytes; every one must end up validated
    "ok/rgb.png": png_bytes(1),
    "ok/rgba.png": _encode(Image.new("RGBA", (40, 40), (200, 10, 10, 128)), "PNG"),
    "ok/palette.png": _encode(Image.new("RGB", (40, 40), (9, 99, 199)).convert("P"), "PNG"),
    "ok/cmyk.jpg": _encode(Image.new("CMYK", (40, 40), (0, 80, 160, 0)), "JPEG"),
    "ok/gray16.png": _encode(Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)), "PNG"),
    "ok/gray.png": _encode(Image.new("L", (40, 40), 77), "PNG"),
    f"{NFD_CLASS}/nfd.png": png_bytes(2),
}
BAD = {  # key -> fragment of the quarantine reason
    "bad/truncated.png": ("not a decodable image", png_bytes(3)[:150]),
    "bad/zero.png": ("not a decodable image", b""),
    "bad/text.png": ("not a decodable image", b"this is a text file, not a picture\n"),
    "bad/anim.gif": ("format not in", _encode(Image.new("P", (40, 40)), "GIF")),
    "bad/bomb.png": ("decompression bomb", _bomb_png()),
    "bad/tiny.png": ("width below validate.min_side", png_bytes(4, size=8)),
    "conflict_a/same.png": ("label conflict: same bytes as", png_bytes(5)),
    "conflict_b/same.png": ("label conflict: same bytes as", png_bytes(5)),
}
REFUSED = {"top.png": "no class folder", "ok/deeper/x.png": "nested folder"}


@pytest.fixture()
def landed(s3, tmp_path):
    prefix = f"bad-{tmp_path.name}/"
    for key, data in {**GOOD, **{k: v[1] for k, v in BAD.items()}, **{k: png_bytes(9) for k in REFUSED}}.items():
        s3.put_object(Bucket="landing", Key=prefix + key, Body=data)
    s3.put_object(Bucket="landing", Key=prefix + "empty_class/", Body=b"")  # an empty class folder marker
    cfg = config_from_dict(
        {"data": {"landing_uri": f"s3://landing/{prefix}"}, "validate": {"max_quarantine_share": 1.0}}
    )
    return prefix, cfg, tmp_path


def _run(cfg, tmp: Path):
    d = tmp / "data"
    run_ingest(cfg, d / "raw", d / "manifest.csv", d / "rejects.csv")
    return run_validate(
        cfg,
        d / "raw",
        d / "manifest.csv",
        d / "rejects.csv",
        d / "validated.csv",
        d / "quarantine.csv",
        tmp / "validation.json",
        tmp / "docs",
    )


def test_every_bad_object_is_quarantined_with_its_reason_and_no_good_one_is_lost(landed):
    prefix, cfg, tmp = landed
    report = _run(cfg, tmp)
    quarantine = {r["source_key"][len(prefix) :]: r["reason"] for r in read_csv(tmp / "data" / "quarantine.csv")}
    for key, (reason, _) in BAD.items():
        assert reason in quarantine.get(key, ""), (key, quarantine.get(key))
    for key, reason in REFUSED.items():
        assert reason in quarantine[key], key
    assert "conflict_b/same.png" in quarantine["conflict_a/same.png"]
    validated = {r["source_key"][len(prefix) :]: r for r in read_csv(tmp / "data" / "validated.csv")}
    assert set(validated) == set(GOOD)  # every good image kept, whatever its mode
    assert validated[f"{NFD_CLASS}/nfd.png"]["class_name"] == "곰팡이"  # NFC
    assert "empty_class" not in report["class_counts"]
    assert report["quarantined"] == len(BAD) + len(REFUSED)
    assert (tmp / "docs" / "index.html").exists()  # GX Data Docs


def test_accepted_modes_are_normalised_to_rgb(landed):
    _, cfg, tmp = landed
    _run(cfg, tmp)
    for row in read_csv(tmp / "data" / "validated.csv"):
        im = decode_rgb(str(tmp / "data" / "raw" / row["path"]))
        assert im.mode == "RGB", row["path"]


def test_too_many_bad_files_fail_the_dataset_with_a_summary(landed):
    prefix, _, tmp = landed
    cfg = config_from_dict({"data": {"landing_uri": f"s3://landing/{prefix}"}})  # default limit 10 %
    with pytest.raises(ValidationFailed, match=r"objects quarantined .* > validate.max_quarantine_share=10%"):
        _run(cfg, tmp)
    assert len(read_csv(tmp / "data" / "quarantine.csv")) == len(BAD) + len(REFUSED)  # still written


def test_strict_classes_fail_when_a_class_is_missing(landed):
    prefix, _, tmp = landed
    cfg = config_from_dict(
        {
            "data": {
                "landing_uri": f"s3://landing/{prefix}",
                "strict_classes": True,
                "expected_classes": ["ok", "곰팡이", "missing_class"],
            },
            "validate": {"max_quarantine_share": 1.0},
        }
    )
    with pytest.raises(ValidationFailed, match=r"expected classes missing .*missing_class"):
        _run(cfg, tmp)


def test_second_ingest_downloads_nothing_and_follows_deletes(landed, s3):
    prefix, cfg, tmp = landed
    d = tmp / "data"
    run_ingest(cfg, d / "raw", d / "manifest.csv", d / "rejects.csv")
    again = run_ingest(cfg, d / "raw", d / "manifest.csv", d / "rejects.csv")
    assert again["downloaded"] == 0 and again["removed"] == 0
    s3.delete_object(Bucket="landing", Key=prefix + "ok/gray.png")
    s3.put_object(Bucket="landing", Key=prefix + "ok/rgb.png", Body=png_bytes(77))  # changed content
    third = run_ingest(cfg, d / "raw", d / "manifest.csv", d / "rejects.csv")
    assert third["downloaded"] == 1 and third["removed"] == 1
    assert not (d / "raw" / "ok" / "gray.png").exists()
    assert third["fingerprint"] != again["fingerprint"]


def test_object_changing_during_sync_keeps_the_copy_downloaded(landed, s3, monkeypatch):
    prefix, cfg, tmp = landed
    real_list = storage.list_objects

    def list_then_change(uri):
        listing = real_list(uri)
        s3.put_object(Bucket="landing", Key=prefix + "ok/gray.png", Body=png_bytes(123))  # changes after listing
        return listing

    monkeypatch.setattr(storage, "list_objects", list_then_change)
    d = tmp / "data"
    run_ingest(cfg, d / "raw", d / "manifest.csv", d / "rejects.csv")
    monkeypatch.setattr(storage, "list_objects", real_list)
    row = next(r for r in read_csv(d / "manifest.csv") if r["path"] == "ok/gray.png")
    assert (d / "raw" / "ok" / "gray.png").read_bytes() == png_bytes(123)  # what we hold matches its hash
    etag_now = next(o.etag for o in real_list(cfg.data.landing_uri) if o.key.endswith("ok/gray.png"))
    assert row["etag"] == etag_now  # so the next ingest does not download it again
    assert run_ingest(cfg, d / "raw", d / "manifest.csv", d / "rejects.csv")["downloaded"] == 0


def test_dotdot_key_is_refused_by_the_server_and_by_us(s3):
    from botocore.exceptions import ClientError

    from pipeline.stages.ingest import safe_relative_key

    with pytest.raises(ClientError):
        s3.put_object(Bucket="landing", Key="evil/../escape.png", Body=b"x")
    assert "'..'" in safe_relative_key("evil/../escape.png")


def test_missing_bucket_is_a_clear_refusal(stack, tmp_path):
    cfg = config_from_dict({"data": {"landing_uri": "s3://no-such-bucket/x/"}})
    with pytest.raises(StorageError, match="bucket does not exist"):
        run_ingest(cfg, tmp_path / "raw", tmp_path / "m.csv", tmp_path / "r.csv")
