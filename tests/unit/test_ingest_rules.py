import unicodedata

import pytest

from pipeline.core.config import config_from_dict
from pipeline.stages.ingest import fingerprint, safe_relative_key
from pipeline.stages.split import assign_splits

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "key,reason",
    [
        ("../etc/passwd", "'.', '..'"),
        ("a/../b.png", "'.', '..'"),
        ("/abs.png", "absolute"),
        ("top.png", "no class folder"),
        ("a/b/c.png", "nested folder"),
        ("a/b\x07.png", "unprintable character U+0007"),
        ("a/\u202egnp.exe.png", "unprintable character U+202E"),  # bidi override: spoofs the shown name
        ("a\u200b/x.png", "unprintable character U+200B"),  # zero-width: a class that looks like "a"
        ("a/" + "가" * 81, "longer than 240 bytes"),
        ("a/.hidden", "hidden file"),
    ],
)
def test_unsafe_keys_are_refused_with_a_reason(key, reason):
    out = safe_relative_key(key)
    assert isinstance(out, str) and reason in out


def test_nfd_folder_becomes_nfc_class():
    nfd = unicodedata.normalize("NFD", "창틀,문틀수정")
    assert safe_relative_key(f"{nfd}/001.png") == ("창틀,문틀수정", "001.png")


def test_fingerprint_ignores_order_and_sees_content():
    rows = [{"class_name": "a", "sha256": "1"}, {"class_name": "b", "sha256": "2"}]
    assert fingerprint(rows) == fingerprint(rows[::-1])
    assert fingerprint(rows) != fingerprint([rows[0], {"class_name": "a", "sha256": "2"}])


def test_split_keeps_duplicates_together_and_small_classes_in_train():
    cfg = config_from_dict({"data": {"landing_uri": "s3://x/"}, "split": {"min_class_for_split": 5}})
    rows = []
    for c in ("a", "b"):
        for i in range(20):
            rows.append({"path": f"{c}/{i}.png", "class_name": c, "sha256": f"{c}{i}", "dhash": f"{c}{i}"})
    rows.append({"path": "a/dup.png", "class_name": "a", "sha256": "a3", "dhash": "zz"})  # same bytes as a/3
    rows += [{"path": f"tiny/{i}.png", "class_name": "tiny", "sha256": f"t{i}", "dhash": f"t{i}"} for i in range(2)]
    out, train_only = assign_splits(rows, cfg)
    by_path = {r["path"]: r["split"] for r in out}
    assert by_path["a/dup.png"] == by_path["a/3.png"]
    assert train_only == ["tiny"] and by_path["tiny/0.png"] == "train"
    assert {r["split"] for r in out if r["class_name"] == "a"} == {"train", "val", "test"}
    again, _ = assign_splits(rows, cfg)
    assert again == out  # same seed, same split


def test_split_is_stable_when_new_images_land():
    """Images already split never move, so the champion is never re-scored on images it trained on."""
    import hashlib

    cfg = config_from_dict({"data": {"landing_uri": "s3://x/"}})

    def rows(n: int) -> list[dict]:
        return [
            {
                "path": f"{c}/{i}.png",
                "class_name": c,
                "sha256": hashlib.sha256(f"{c}{i}".encode()).hexdigest(),
                "dhash": hashlib.md5(f"{c}{i}".encode()).hexdigest()[:16],
            }
            for c in ("a", "b")
            for i in range(n)
        ]

    before = {r["path"]: r["split"] for r in assign_splits(rows(100), cfg)[0]}
    after = {r["path"]: r["split"] for r in assign_splits(rows(120), cfg)[0]}
    assert all(after[p] == s for p, s in before.items())
    share = sum(s == "test" for s in after.values()) / len(after)
    assert 0.08 < share < 0.22, share  # about test_fraction (0.15), by hash not by quota
