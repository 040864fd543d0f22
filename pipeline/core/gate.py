"""The promotion rule: a pure function of the labels candidate and champion gave for the same test images.

The statistics behind it are in :mod:`pipeline.core.gate_stats`; the stage that applies it (scoring both registered
versions, tags, aliases) is :mod:`pipeline.stages.register`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.gate_stats import CI_LEVEL, RESAMPLES, SEED, PairedBootstrap, paired_bootstrap, weighted_f1

GATE_RULE = (
    f"promote when there are >= min_test_images test images, weighted F1 >= floor and, against a "
    f"champion, P(ΔwF1 > min_delta) >= confidence "
    f"by a paired bootstrap over the test images ({RESAMPLES} resamples, seed {SEED})"
)


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and the numbers behind it (all from the pyfuncs, on one test frame)."""

    promote: bool
    reason: str
    candidate_f1: float
    n_test: int
    champion_f1: float | None = None
    stats: PairedBootstrap | None = None  # None: no champion to compare with

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "rejected"


def gate(
    truth: list[str],
    candidate: list[str],
    champion: list[str] | None,
    floor: float,
    min_delta: float,
    confidence: float,
    min_test_images: int = 1,
) -> GateDecision:
    """The promotion rule, as a pure function of the labels both pyfuncs gave for the same test images.

    Promote when the candidate's package labels every test image, its weighted F1 holds the floor and, if there
    is a champion, a paired bootstrap over the test images puts P(ΔwF1 > min_delta) at or above ``confidence``
    (ΔwF1 = candidate − champion). A tie, or a difference that a few images could make, is not an improvement.
    An empty label is an image the pyfunc could not read: validate decoded every test image, so that is a
    broken package, never promoted (not even as a first champion over a floor of 0). Fewer than
    ``min_test_images`` test images promote nothing either: on a handful of images the interval means little.
    """
    f1, n = weighted_f1(truth, candidate), len(truth)
    if n < min_test_images:
        return GateDecision(
            False,
            f"{n} test images < registry.min_test_images {min_test_images}: too few to "
            f"tell a better model from luck; the champion stays",
            f1,
            n,
        )
    unread = sum(1 for label in candidate if label == "")
    if unread:
        return GateDecision(False, f"the registered package gave no label for {unread} of {n} test images", f1, n)
    if f1 < floor:
        return GateDecision(False, f"weighted F1 {f1:.4f} < floor {floor:.4f}", f1, n)
    if champion is None:
        return GateDecision(True, f"no champion yet; weighted F1 {f1:.4f} >= floor {floor:.4f}", f1, n)
    stats = paired_bootstrap(truth, candidate, champion, min_delta)
    champion_f1 = weighted_f1(truth, champion)
    promote = stats.p_improve >= confidence
    verdict = ">=" if promote else "<"
    reason = (
        f"P(ΔwF1 > {min_delta:g}) = {stats.p_improve:.4f} {verdict} confidence {confidence:g}; "
        f"weighted F1 {f1:.4f} vs champion {champion_f1:.4f}, ΔwF1 {stats.delta:+.4f} "
        f"({CI_LEVEL:.0%} CI {stats.ci_low:+.4f} to {stats.ci_high:+.4f}) on {n} test images"
    )
    return GateDecision(promote, reason, f1, n, champion_f1, stats)


def gate_tags(decision: GateDecision, confidence: float) -> dict[str, str]:
    """The version tags an auditor reads the decision from (empty where there was no champion)."""
    s = decision.stats
    return {
        "gate_candidate_wf1": f"{decision.candidate_f1:.6f}",
        "gate_n_test": str(decision.n_test),
        "gate_confidence": f"{confidence:g}",
        "gate_rule": GATE_RULE,
        "gate_delta_wf1": "" if s is None else f"{s.delta:.6f}",
        "gate_delta_ci_low": "" if s is None else f"{s.ci_low:.6f}",
        "gate_delta_ci_high": "" if s is None else f"{s.ci_high:.6f}",
        "gate_ci_level": f"{CI_LEVEL:g}",
        "gate_p_improve": "" if s is None else f"{s.p_improve:.4f}",
        "champion_f1_rescored": "" if decision.champion_f1 is None else f"{decision.champion_f1:.6f}",
    }
