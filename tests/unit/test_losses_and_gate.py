import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core.gate import gate
from pipeline.core.gate_stats import paired_bootstrap, weighted_f1, weighted_f1_from_counts
from pipeline.core.losses import FocalLoss

pytestmark = pytest.mark.unit

CLASSES = ["mono_p000", "mono_p033", "poly_p000", "poly_p100", "창틀,문틀수정"]


def test_focal_gamma0_equals_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 7), torch.randint(0, 7, (16,))
    ours = FocalLoss(gamma=0.0, label_smoothing=0.1)(logits, target)
    ref = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_focal_down_weights_easy_examples():
    logits = torch.tensor([[6.0, 0.0], [0.2, 0.0]])  # one easy, one hard example of class 0
    target = torch.tensor([0, 0])
    per = [
        FocalLoss(2.0)(logits[i : i + 1], target[i : i + 1]) / F.cross_entropy(logits[i : i + 1], target[i : i + 1])
        for i in range(2)
    ]
    assert per[0] < 0.01 < per[1]


def _champion_and_truth(n: int = 376, errors: int = 110, seed: int = 0) -> tuple[list[str], list[str]]:
    """A test split the size of the ELPV demo's and a champion wrong on ``errors`` of its images."""
    rng = np.random.default_rng(seed)
    truth = [CLASSES[i] for i in rng.integers(0, len(CLASSES), n)]
    champion = list(truth)
    for i in rng.choice(n, errors, replace=False):
        champion[i] = CLASSES[(CLASSES.index(truth[i]) + 1 + rng.integers(0, len(CLASSES) - 1)) % len(CLASSES)]
    return truth, champion


def _fix(truth: list[str], pred: list[str], k: int) -> list[str]:
    """``pred`` with its first ``k`` errors corrected."""
    out, fixed = list(pred), 0
    for i, (t, p) in enumerate(zip(truth, pred)):
        if fixed < k and t != p:
            out[i], fixed = t, fixed + 1
    return out


def test_a_one_image_difference_is_not_promoted():
    truth, champion = _champion_and_truth()
    candidate = _fix(truth, champion, 1)
    d = gate(truth, candidate, champion, floor=0.0, min_delta=0.0, confidence=0.9)
    assert d.candidate_f1 > d.champion_f1  # better on paper: the old rule (>= champion + 0) promoted this
    assert not d.promote and d.stats.n == 376
    # Δ > 0 exactly when a resample draws the fixed image: 1 - (1 - 1/376)^376 ≈ 0.63
    assert 0.58 < d.stats.p_improve < 0.68
    assert d.stats.ci_low == 0.0 < d.stats.ci_high
    assert "P(ΔwF1 > 0) = 0.6" in d.reason and "< confidence 0.9" in d.reason and "376 test images" in d.reason


def test_a_clear_improvement_is_promoted():
    truth, champion = _champion_and_truth()
    candidate = _fix(truth, champion, 40)  # about 10 points of accuracy
    d = gate(truth, candidate, champion, floor=0.0, min_delta=0.0, confidence=0.9)
    assert d.promote and d.stats.p_improve == 1.0 and d.stats.ci_low > 0.05
    assert ">= confidence 0.9" in d.reason


def test_ties_and_worse_candidates_are_rejected_and_min_delta_raises_the_bar():
    truth, champion = _champion_and_truth()
    tie = gate(truth, list(champion), champion, 0.0, 0.0, 0.9)
    assert not tie.promote and tie.stats.p_improve == 0.0 and tie.stats.delta == 0.0
    worse = gate(truth, champion, _fix(truth, champion, 40), 0.0, 0.0, 0.9)
    assert not worse.promote and worse.stats.p_improve == 0.0 and worse.stats.ci_high < 0
    candidate = _fix(truth, champion, 40)
    assert not gate(truth, candidate, champion, 0.0, 0.5, 0.9).promote  # a ~0.1 gain is not a gain of 0.5


def test_no_champion_needs_only_the_floor():
    truth, champion = _champion_and_truth()
    first = gate(truth, champion, None, floor=0.5, min_delta=0.0, confidence=0.9)
    assert first.promote and first.stats is None and first.reason.startswith("no champion yet; weighted F1")
    low = gate(truth, champion, None, floor=0.9, min_delta=0.0, confidence=0.9)
    assert not low.promote and "< floor 0.9000" in low.reason
    # the floor also holds against a champion: a clear gain that stays under it is rejected
    assert not gate(truth, _fix(truth, champion, 40), champion, 0.99, 0.0, 0.9).promote


def test_the_bootstrap_is_seeded_and_its_weighted_f1_is_sklearns():
    from sklearn.metrics import f1_score

    truth, champion = _champion_and_truth(n=120, errors=50, seed=3)
    candidate = _fix(truth, champion, 8)
    assert paired_bootstrap(truth, candidate, champion) == paired_bootstrap(truth, candidate, champion)
    assert weighted_f1(truth, champion) == pytest.approx(
        f1_score(truth, champion, average="weighted", zero_division=0), abs=1e-12
    )
    # resampled: weights = draw counts; sklearn on the expanded lists must agree
    rng = np.random.default_rng(1)
    y = np.array([CLASSES.index(t) for t in truth])
    p = np.array([CLASSES.index(t) for t in champion])
    counts = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=5).astype(float)
    ours = weighted_f1_from_counts(counts, y, p, len(CLASSES))
    for row, value in zip(counts.astype(int), ours):
        idx = np.repeat(np.arange(len(y)), row)
        assert value == pytest.approx(f1_score(y[idx], p[idx], average="weighted", zero_division=0), abs=1e-12)


def test_unreadable_images_count_as_errors():
    truth = ["a", "b", "a", "b"]
    assert weighted_f1(truth, ["a", "b", "", "b"]) < weighted_f1(truth, truth) == 1.0


def test_a_package_that_cannot_read_a_test_image_is_never_promoted():
    truth, champion = _champion_and_truth()
    broken = list(truth)
    broken[7] = ""  # the pyfunc's answer for an image it could not decode
    first = gate(truth, broken, None, floor=0.0, min_delta=0.0, confidence=0.9)
    assert not first.promote and first.reason == "the registered package gave no label for 1 of 376 test images"


def test_the_champion_lookup_fails_closed():
    """Only the registry's own "there is none" means no champion; any other failure is transient, never None."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    from pipeline.adapters.tracking import TrackingError, version_by_alias

    class Registry:
        def __init__(self, exc):
            self.exc = exc

        def get_model_version_by_alias(self, name, alias):
            raise self.exc

    none = [
        MlflowException("Registered Model with name=m not found", error_code=RESOURCE_DOES_NOT_EXIST),
        MlflowException("Registered model alias champion not found.", error_code=INVALID_PARAMETER_VALUE),
    ]
    for exc in none:
        assert version_by_alias(Registry(exc), "m", "champion") is None
    broken = [
        ConnectionError("refused"),
        TimeoutError(),
        MlflowException("API request to …/registered-models/alias failed: 503", error_code=INTERNAL_ERROR),
        MlflowException("Invalid alias name 'x y'", error_code=INVALID_PARAMETER_VALUE),
    ]
    for exc in broken:
        with pytest.raises(TrackingError, match="alias champion of m") as info:
            version_by_alias(Registry(exc), "m", "champion")
        assert info.value.transient
