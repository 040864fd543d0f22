"""The label-issue finder: out-of-bag bookkeeping, cleanlab's ranking, and the stage's files.

Probabilities must be out-of-sample: a member that trained on an image (or on a duplicate of it) never scores
it, an image every member trained on stays unscored, and a planted flipped label comes out on top.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import config_from_dict
from pipeline.core.data import bootstrap_indices
from pipeline.core.errors import ConfigError
from pipeline.core.oob import SOURCE_UNSCORED, in_bag_matrix, out_of_bag_probs, train_sources
from pipeline.stages import label_issues as li

pytestmark = pytest.mark.unit

CLASSES = ["곰팡이", "오염", "창틀,문틀수정"]  # sorted, as load_split orders them; one holds a comma


def test_in_bag_matrix_is_each_members_bootstrap_resample():
    labels = [i % 3 for i in range(40)]
    seen = in_bag_matrix(labels, (0, 1, 2), bootstrap=True)
    for m, seed in enumerate((0, 1, 2)):
        assert set(np.flatnonzero(seen[:, m])) == set(bootstrap_indices(labels, seed))
        assert 0 < seen[:, m].sum() < len(labels)  # a resample leaves images out: those are out-of-bag
    assert in_bag_matrix(labels, (0, 1), bootstrap=False).all()  # no resample: every member saw every image


def test_a_duplicate_seen_in_training_counts_as_seen():
    labels = [0] * 12
    alone = in_bag_matrix(labels, (0,), bootstrap=True)
    i, j = int(np.flatnonzero(alone[:, 0])[0]), int(np.flatnonzero(~alone[:, 0])[0])
    groups = [str(k) for k in range(12)]
    groups[j] = groups[i]  # j is a near-duplicate of an image member 0 trained on
    grouped = in_bag_matrix(labels, (0,), bootstrap=True, groups=groups)
    assert grouped[j, 0] and grouped[i, 0]
    assert (np.delete(grouped, j, 0) == np.delete(alone, j, 0)).all()


def test_out_of_bag_probs_come_only_from_members_that_never_saw_the_image():
    labels = [i % 2 for i in range(30)]
    seen = in_bag_matrix(labels, (0, 1, 2), bootstrap=True)
    # A member that trained on an image "memorised" its label (one-hot on class 0); one that did not says class 1.
    member_probs = [np.where(seen[:, [m]], [1.0, 0.0], [0.2, 0.8]) for m in range(3)]
    probs = out_of_bag_probs(member_probs, seen)
    sources = train_sources(seen, ["member_0", "member_1", "member_2"])
    every = seen.all(axis=1)
    assert every.any() and (~every).any()
    assert np.isnan(probs[every]).all()
    np.testing.assert_allclose(probs[~every], np.tile([0.2, 0.8], ((~every).sum(), 1)))
    for i in range(30):
        if every[i]:
            assert sources[i] == SOURCE_UNSCORED
        else:
            unseen = [f"member_{m}" for m in range(3) if not seen[i, m]]
            assert sources[i] == "oob:" + "+".join(unseen)


def _blobs(n_per_class: int = 20, seed: int = 0):
    """Three well-separated 2-D classes and out-of-sample probabilities from a tiny model (5-fold logistic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [6, 0], [0, 6]])
    y = np.repeat(np.arange(3), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), 2))
    return x, y, LogisticRegression, cross_val_predict


def test_a_planted_flipped_label_is_ranked_first_and_flagged():
    x, y, model, cross_val_predict = _blobs()
    given = y.copy()
    flipped = 7  # truly class 0 (곰팡이), labelled 창틀,문틀수정
    given[flipped] = 2
    probs = cross_val_predict(model(), x, given, cv=5, method="predict_proba")
    probs[[3, 25]] = np.nan  # two images every member trained on: unscored
    paths = [f"{CLASSES[c]}/{i:03d}.png" for i, c in enumerate(given)]
    sources = [SOURCE_UNSCORED if i in (3, 25) else "oob:member_1" for i in range(len(y))]
    rows = li.build_report(
        paths, ["train"] * len(y), given, probs, sources, CLASSES, "prune_by_noise_rate", "self_confidence"
    )
    top = rows[0]
    assert (top["rank"], top["path"], top["issue"]) == (1, paths[flipped], True)
    assert (top["given_class"], top["suggested_class"]) == ("창틀,문틀수정", "곰팡이")
    assert [r["rank"] for r in rows[:-2]] == list(range(1, len(y) - 1))
    assert {r["path"] for r in rows[-2:]} == {paths[3], paths[25]}  # unscored: last, no rank, no score
    assert all(r["rank"] == "" and r["label_quality"] == "" and not r["issue"] for r in rows[-2:])


def _png(fp, shade: int) -> None:
    fp.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (shade, 255 - shade, 40)).save(fp)


def test_stage_writes_ranked_csv_ascii_metrics_and_grid(tmp_path, monkeypatch):
    """The stage on a tiny split (Korean names, one with a comma) with stand-in members: a planted flip in val
    tops the CSV, unscored train images are counted, the metrics file is ASCII, the grid is drawn."""
    raw = tmp_path / "raw"
    rows, flipped = [], "곰팡이/v_flip.png"
    for c, name in enumerate(CLASSES):
        for k in range(10):
            rows.append(
                {
                    "path": f"{name}/t{k}.png",
                    "class_name": name,
                    "sha256": f"{c}t{k}",
                    "split": "train",
                    "group": f"{c}t{k}",
                }
            )
        for k in range(4):
            rows.append(
                {
                    "path": f"{name}/v{k}.png",
                    "class_name": name,
                    "sha256": f"{c}v{k}",
                    "split": "val",
                    "group": f"{c}v{k}",
                }
            )
    rows.append({"path": flipped, "class_name": "곰팡이", "sha256": "flip", "split": "val", "group": "flip"})
    for k, r in enumerate(rows):
        _png(raw / r["path"], 10 * k % 250)
    split_fp = tmp_path / "split.csv"
    with open(split_fp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    truth = {r["path"]: (2 if r["path"] == flipped else CLASSES.index(r["class_name"])) for r in rows}

    def fake_members(dirs, device, raw_dir, paths, shas, cache_dir, rows=None):  # two confident, correct members
        p = np.full((len(paths), 3), 0.05)
        p[np.arange(len(paths)), [truth[x] for x in paths]] = 0.9
        return CLASSES, [p, p]

    monkeypatch.setattr(li, "member_probabilities", fake_members)
    cfg = config_from_dict({"data": {"landing_uri": "s3://b/p/"}, "bag": {"seeds": [0, 1]}, "train": {"device": "cpu"}})
    out = tmp_path / "reports"
    summary = li.run_label_issues(
        cfg,
        split_fp,
        raw,
        tmp_path / "models",
        out / "label_issues.csv",
        out / "label_issues.json",
        out / "label_issues.png",
    )
    with open(out / "label_issues.csv", newline="", encoding="utf-8") as fh:
        got = list(csv.DictReader(fh))
    assert got[0]["path"] == flipped and got[0]["rank"] == "1" and got[0]["issue"] == "True"
    assert (got[0]["given_class"], got[0]["suggested_class"], got[0]["source"]) == (
        "곰팡이",
        "창틀,문틀수정",
        "val:all_members",
    )
    seen = in_bag_matrix([CLASSES.index(r["class_name"]) for r in rows if r["split"] == "train"], (0, 1), True)
    assert summary["n_unscored"] == int(seen.all(axis=1).sum()) == sum(r["source"] == SOURCE_UNSCORED for r in got)
    assert summary["n_scored"] + summary["n_unscored"] == summary["n_images"] == len(rows) == len(got)
    assert summary["by_source"]["val"] == 13 and summary["flagged_per_class"]["곰팡이"] >= 1
    (out / "label_issues.json").read_bytes().decode("ascii")  # DVC refuses UTF-8 metrics
    assert (out / "label_issues.png").stat().st_size > 5000


def test_label_issue_params_are_checked_by_name():
    with pytest.raises(ConfigError, match="label_issues.filter_by"):
        config_from_dict({"data": {"landing_uri": "s3://b/p/"}, "label_issues": {"filter_by": "vibes"}})


def test_stage_on_real_tiny_members_scores_each_image_with_its_out_of_bag_members(tmp_path):
    """Two real members (timm test model, 1 epoch): each train image's p_given is the mean of exactly the
    members whose resample left it out, computed here member by member; val images use both members."""
    from pipeline.core.data import build_cache, load_split
    from pipeline.core.inference import BagPredictor
    from pipeline.stages.train import run_train
    from tests.integration.helpers import write_tiny_split

    write_tiny_split(tmp_path, per_class=8, val_per_class=2)
    cfg = config_from_dict(
        {
            "data": {"landing_uri": "s3://x/"},
            "model": {"backbone": "test_efficientnet", "img_size": 32, "weights": "none"},
            "train": {
                "epochs": 1,
                "batch_size": 6,
                "num_workers": 0,
                "amp": "none",
                "channels_last": False,
                "device": "cpu",
                "num_threads": 1,
            },
            "bag": {"seeds": [0, 1], "bootstrap": True},
        }
    )
    models = tmp_path / "models"
    for seed in (0, 1):
        run_train(
            cfg,
            tmp_path / "split.csv",
            tmp_path / "raw",
            seed,
            models / f"member_{seed}",
            cache_dir=tmp_path / "cache",
            ckpt_dir=tmp_path / "ckpt",
        )
    out = tmp_path / "reports"
    summary = li.run_label_issues(
        cfg,
        tmp_path / "split.csv",
        tmp_path / "raw",
        models,
        out / "li.csv",
        out / "li.json",
        out / "li.png",
        cache_dir=tmp_path / "cache",
    )
    split = load_split(tmp_path / "split.csv")
    own = {}
    for which in ("train", "val"):
        imgs = {32: build_cache(tmp_path / "raw", split.paths[which], split.sha256[which], 32, None)}
        probs = [BagPredictor.from_dirs([models / f"member_{s}"]).predict_proba_arrays(imgs) for s in (0, 1)]
        for i, path in enumerate(split.paths[which]):
            own[path] = (split.labels[which][i], probs)
    seen = in_bag_matrix(split.labels["train"], (0, 1), True)
    with open(out / "li.csv", newline="", encoding="utf-8") as fh:
        got = {r["path"]: r for r in csv.DictReader(fh)}
    assert len(got) == summary["n_images"] == len(split.paths["train"]) + len(split.paths["val"])
    assert 0 < summary["n_unscored"] < len(split.paths["train"])  # both kinds of train image occur here
    for i, path in enumerate(split.paths["train"]):
        y, probs = own[path]
        unseen = [m for m in (0, 1) if not seen[i, m]]
        if not unseen:
            assert got[path]["source"] == SOURCE_UNSCORED and got[path]["p_given"] == ""
        else:
            assert got[path]["source"] == "oob:" + "+".join(f"member_{m}" for m in unseen)
            assert float(got[path]["p_given"]) == pytest.approx(np.mean([probs[m][i, y] for m in unseen]), abs=2e-6)
    for i, path in enumerate(split.paths["val"]):
        y, probs = own[path]
        assert got[path]["source"] == "val:all_members"
        assert float(got[path]["p_given"]) == pytest.approx((probs[0][i, y] + probs[1][i, y]) / 2, abs=2e-6)


def test_model_card_states_the_label_issue_counts():
    from pipeline.stages.model_card import label_issues_card

    summary = {
        "n_images": 43,
        "n_scored": 31,
        "n_unscored": 12,
        "n_flagged": 2,
        "flagged_share": 0.0645,
        "by_source": {"oob": 18, "val": 13, "unscored": 12},
        "flagged_per_class": {"창틀,문틀수정": 2},
        "filter_by": "prune_by_noise_rate",
        "ranked_by": "self_confidence",
    }
    card = "\n".join(label_issues_card(summary))
    assert "flagged: 2 of 31 scored" in card and "창틀,문틀수정 2" in card
    assert "unscored 12 train images" in card and "18 train images" in card and "13 val images" in card
    assert "reports/label_issues.csv" in card and "reports/label_issues.png" in card
    assert label_issues_card({}) == []  # a run without the stage: no section


def test_one_member_on_all_train_images_scores_val_only(tmp_path):
    """The cpu-demo shape (one member, no resample, no folds): that member trained on every train image, so no
    train image gets an in-sample score; the val images are scored by it, and the stage still writes its list."""
    from pipeline.core.data import build_cache, load_split
    from pipeline.core.inference import BagPredictor
    from pipeline.stages.train import run_train
    from tests.integration.helpers import write_tiny_split

    write_tiny_split(tmp_path, per_class=8, val_per_class=2)
    cfg = config_from_dict(
        {
            "data": {"landing_uri": "s3://x/"},
            "model": {"backbone": "test_efficientnet", "img_size": 32, "weights": "none"},
            "train": {"epochs": 1, "batch_size": 6, "num_workers": 0, "amp": "none", "device": "cpu"},
            "bag": {"seeds": [0], "bootstrap": False, "folds": False},
        }
    )
    models = tmp_path / "models"
    run_train(cfg, tmp_path / "split.csv", tmp_path / "raw", 0, models / "member_0", cache_dir=tmp_path / "cache")
    out = tmp_path / "reports"
    summary = li.run_label_issues(
        cfg, tmp_path / "split.csv", tmp_path / "raw", models, out / "li.csv", out / "li.json", out / "li.png"
    )
    split = load_split(tmp_path / "split.csv")
    with open(out / "li.csv", newline="", encoding="utf-8") as fh:
        got = {r["path"]: r for r in csv.DictReader(fh)}
    assert summary["n_unscored"] == len(split.paths["train"]) == 18
    assert all(got[p]["source"] == SOURCE_UNSCORED and got[p]["p_given"] == "" for p in split.paths["train"])
    imgs = {32: build_cache(tmp_path / "raw", split.paths["val"], split.sha256["val"], 32, None)}
    probs = BagPredictor.from_dirs([models / "member_0"]).predict_proba_arrays(imgs)
    for i, path in enumerate(split.paths["val"]):
        assert got[path]["source"] == "val:all_members"
        assert float(got[path]["p_given"]) == pytest.approx(probs[i, split.labels["val"][i]], abs=2e-6)
