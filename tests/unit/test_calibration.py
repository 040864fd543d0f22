"""Temperature scaling of the bag: fitted on val, it fixes over-confidence, and it never changes a label."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.core.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    temperature_scale,
)

pytestmark = pytest.mark.unit


def _overconfident(n: int, true_t: float = 2.5, classes: int = 5, seed: int = 0):
    """Labels drawn from softmax(z / true_t) while the model reports softmax(z): over-confident by true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    truth_p = np.exp(z / true_t)
    truth_p /= truth_p.sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=p) for p in truth_p])
    reported = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return reported, labels


def test_fitted_temperature_recovers_the_over_confidence_and_lowers_ece_on_held_out_data():
    val_p, val_y = _overconfident(3000, seed=0)
    test_p, test_y = _overconfident(3000, seed=1)
    t = fit_temperature(val_p, val_y)
    assert t == pytest.approx(2.5, rel=0.15)
    before = expected_calibration_error(test_p, test_y)
    after = expected_calibration_error(temperature_scale(test_p, t), test_y)
    assert before > 0.15 and after < 0.05  # 0.05: the sampling noise of 15-bin ECE on 3,000 images is ~0.02


def test_temperature_never_changes_the_label():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(19, 0.3), 500)
    probs[:5] = np.eye(19)[:5]  # one-hot rows (exact zeros) too
    for t in (0.05, 0.5, 1.0, 3.0, 20.0):
        scaled = temperature_scale(probs, t)
        assert (scaled.argmax(1) == probs.argmax(1)).all()
        np.testing.assert_allclose(scaled.sum(1), 1.0, atol=1e-12)


def test_ece_by_hand():
    # two images at confidence 0.9 (one right) and two at 0.6 (both right): |0.5-0.9|*2/4 + |1-0.6|*2/4 = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    bins = reliability_bins(probs, labels)
    assert len(bins["count"]) == 15 and sum(bins["count"]) == 4


def test_nothing_to_fit_on_keeps_the_temperature_at_one():
    assert fit_temperature(np.zeros((0, 3)), []) == 1.0
    assert fit_temperature(np.full((2, 3), np.nan), [0, 1]) == 1.0
    cal = calibrate(np.zeros((0, 3)), [], np.eye(3), [0, 1, 2])
    assert cal["temperature"] == 1.0 and "ece_val_before" not in cal and cal["ece_test_before"] == 0.0
    # a few validation images, all right: NLL would push T to its lower edge; below MIN_VAL_IMAGES it stays 1
    few_p, few_y = np.array([[0.7, 0.2, 0.1]] * 5), np.zeros(5, dtype=int)
    assert fit_temperature(few_p, few_y) == pytest.approx(0.05, rel=0.05)
    small = calibrate(few_p, few_y)
    assert small["temperature"] == 1.0 and "not fitted: 5 validation images < 30" in small["note"]
    assert small["ece_val_before"] == pytest.approx(small["ece_val_after"])


def _png(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_pyfunc_serves_calibrated_confidence_and_the_same_labels(tmp_path):
    """BagModel reads the ``calibration`` artifact as MLflow hands it over; labels stay, confidence changes."""
    from types import SimpleNamespace

    import timm

    from pipeline.adapters.serving import BagModel, read_temperature
    from pipeline.core import checkpoints

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    member = tmp_path / "member_0"
    sha = checkpoints.save(model.state_dict(), member / "model.pt")
    (member / "meta.json").write_text(
        json.dumps(
            {
                "backbone": "test_efficientnet",
                "img_size": 32,
                "class_names": ["a", "b", "c"],
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
                "model_sha256": sha,
            }
        )
    )
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": 3.0}))
    frame = pd.DataFrame({"image": [_png(i) for i in range(6)]})

    def served(artifacts: dict) -> pd.DataFrame:
        bag = BagModel()
        bag.load_context(SimpleNamespace(artifacts=artifacts))
        return bag.predict(None, frame)

    raw = served({"member_0": str(member)})  # a model registered before calibration: raw confidence
    soft = served({"member_0": str(member), "calibration": str(tmp_path / "calibration.json")})
    assert soft["label"].tolist() == raw["label"].tolist()
    assert (soft["confidence"] < raw["confidence"]).all()  # T > 1 softens
    (tmp_path / "bad.json").write_text(json.dumps({"temperature": -1}))
    assert read_temperature(tmp_path / "bad.json") == 1.0
