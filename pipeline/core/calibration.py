"""Temperature scaling of the bag's probabilities, and how well confidences match accuracy (ECE).

The bag's output is the mean of its members' softmax probabilities ``p̄``. We treat ``log p̄`` as the bag's logits
and fit one temperature ``T`` on the validation split by minimising the negative log-likelihood of the true
labels under ``softmax(log p̄ / T)``. Dividing every logit of a row by the same ``T > 0`` keeps their order, so
the predicted label never changes: only the confidence does (``T > 1`` softens an over-confident bag).

Fitting on ``log p̄`` rather than on each member's logits calibrates exactly what the pyfunc returns (the
averaged probabilities), with one number that every serving path can apply after any averaging (TTA included).

    cal = calibrate(val_probs, val_labels)          # {"temperature": 1.42, "ece_before": 0.08, ...}
    served = temperature_scale(test_probs, cal["temperature"])
"""

from __future__ import annotations

import logging

import numpy as np

_logger = logging.getLogger(__name__)
ECE_BINS = 15  # the usual choice (Guo et al. 2017); equal-width confidence bins
# Below this many validation images T is not fitted (stays 1): a handful of images, all predicted right, would
# drive it to the edge of the range and every served confidence to 1, which says nothing.
MIN_VAL_IMAGES = 30
_EPS = 1e-12  # log(0) guard: a member can give a class exactly zero probability in float32
# log T is searched in [LOG_T_MIN, LOG_T_MAX]: T from 0.05 (sharpen 20x) to 20 (flatten 20x).
LOG_T_MIN, LOG_T_MAX = np.log(0.05), np.log(20.0)


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)`` row by row; ``temperature == 1`` returns ``probs`` renormalised."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.size == 0:
        return probs
    z = np.log(np.clip(probs, _EPS, 1.0)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)  # softmax without overflow
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under the temperature-scaled probabilities."""
    p = temperature_scale(probs, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], _EPS, 1.0))))


def fit_temperature(probs: np.ndarray, labels: list[int] | np.ndarray) -> float:
    """The ``T`` minimising validation NLL: a grid over log T, then golden-section search around the best point.

    Deterministic and cheap (a few hundred evaluations of a vectorised softmax). Returns 1.0 (no change) when
    there is nothing to fit on or the probabilities are not finite.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0 or not np.all(np.isfinite(probs)):
        _logger.warning("calibration: no usable validation probabilities; temperature stays 1")
        return 1.0
    grid = np.linspace(LOG_T_MIN, LOG_T_MAX, 121)
    losses = [nll(probs, labels, np.exp(g)) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (np.sqrt(5) - 1) / 2
    for _ in range(40):  # the bracket shrinks by 0.618 per step: far below any useful precision after 40
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if nll(probs, labels, np.exp(a)) <= nll(probs, labels, np.exp(b)):
            hi = b
        else:
            lo = a
    t = float(np.exp((lo + hi) / 2))
    if i in (0, len(grid) - 1):  # e.g. a val split the bag gets all right: NLL falls on towards T = 0
        _logger.warning(
            "calibration: temperature %.3f is at the edge of the search range; the %d validation "
            "images cannot pin it down (too few, or all predicted right)",
            t,
            len(labels),
        )
    return t


def reliability_bins(probs: np.ndarray, labels: list[int] | np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin: count, mean confidence and accuracy of the top-1 prediction."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64) if len(probs) else np.zeros(0)
    # Bin k holds confidences in (k/n, (k+1)/n]; a confidence of exactly 0 joins the first bin.
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {
        "edges": np.linspace(0, 1, n_bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "confidence": [None if np.isnan(v) else float(v) for v in mean_conf],
        "accuracy": [None if np.isnan(v) else float(v) for v in accuracy],
    }


def expected_calibration_error(probs: np.ndarray, labels: list[int] | np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy − confidence| over equal-width confidence bins."""
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(bins["count"])
    if total == 0:
        return float("nan")
    return float(
        sum(n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n) / total
    )


def calibrate(
    val_probs: np.ndarray,
    val_labels: list[int],
    test_probs: np.ndarray | None = None,
    test_labels: list[int] | None = None,
) -> dict:
    """Fit ``T`` on the validation split; ECE before/after on it and, held out, on the test split.

    With fewer than :data:`MIN_VAL_IMAGES` validation images ``T`` stays 1 and ``note`` says why.
    """
    out: dict = {
        "fitted_on": "val",
        "n_val": len(val_labels),
        "bins": ECE_BINS,
        "method": "temperature scaling of log(mean member probability), NLL on the val split",
    }
    if len(val_labels) < MIN_VAL_IMAGES:
        t = 1.0
        out["note"] = (
            f"not fitted: {len(val_labels)} validation images < {MIN_VAL_IMAGES}; confidences are the "
            "bag's raw averages"
        )
        _logger.warning("calibration %s", out["note"])
    else:
        t = fit_temperature(val_probs, val_labels)
    out["temperature"] = t
    splits = {"val": (val_probs, val_labels)}
    if test_probs is not None and test_labels is not None:
        splits["test"] = (test_probs, test_labels)
        out["n_test"] = len(test_labels)
    for split, (probs, labels) in splits.items():
        if len(labels) == 0:  # nothing to measure: no ECE keys rather than NaN (not a JSON number)
            continue
        scaled = temperature_scale(probs, t)
        out[f"ece_{split}_before"] = expected_calibration_error(probs, labels)
        out[f"ece_{split}_after"] = expected_calibration_error(scaled, labels)
        out[f"reliability_{split}"] = {
            "before": reliability_bins(probs, labels),
            "after": reliability_bins(scaled, labels),
        }
    return out
