"""Korean class names render as text in every picture (``pipeline/core/figures.py``), never as empty boxes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.core import figures
from tests.integration.helpers import DACON_CLASSES

pytestmark = pytest.mark.unit


def missing_glyph_warnings(draw) -> list[str]:
    """Run ``draw`` and return matplotlib's "Glyph … missing from font(s) …" warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw()
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_the_19_class_names_render_with_the_hangul_font():
    from matplotlib import font_manager

    n = len(DACON_CLASSES)
    with figures.hangul_figure((8, 8)) as (fig, ax):
        ax.imshow(np.eye(n))
        ax.set_xticks(range(n), DACON_CLASSES, rotation=90)
        ax.set_yticks(range(n), DACON_CLASSES)
        ax.set_title("혼동 행렬 −1")  # NanumGothic has no U+2212: the DejaVu Sans fallback must draw it
        missing = missing_glyph_warnings(fig.canvas.draw)
        labels = ax.get_xticklabels() + ax.get_yticklabels()
        families = {
            font_manager.get_font(font_manager.findfont(label.get_fontproperties())).family_name for label in labels
        }
    assert missing == []
    assert sorted(label.get_text() for label in labels) == sorted(DACON_CLASSES * 2)
    assert families == {"NanumGothic"} and figures.hangul_family() == "NanumGothic"


def test_the_bundled_font_comes_from_the_package_files_not_its_import():
    import sys

    assert figures.bundled_font_file().name == "NanumGothic.ttf"
    assert "koreanize_matplotlib" not in sys.modules  # importing it would rewrite matplotlib's global settings


def test_the_confusion_matrix_png_has_every_name(tmp_path):
    n = len(DACON_CLASSES)
    cm = np.arange(n * n).reshape(n, n)
    fp = tmp_path / "sub" / "confusion.png"
    assert missing_glyph_warnings(lambda: figures.plot_confusion(cm, DACON_CLASSES, fp)) == []
    assert fp.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_global_matplotlib_setting_is_left_behind():
    import matplotlib

    before = list(matplotlib.rcParams["font.family"])
    with figures.hangul_figure((2, 2)):
        assert matplotlib.rcParams["font.family"][0] == "NanumGothic"
    assert list(matplotlib.rcParams["font.family"]) == before


def test_without_the_font_package_a_plot_still_draws_and_the_log_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(figures, "bundled_font_file", lambda: None)
    monkeypatch.setattr(figures, "SYSTEM_HANGUL_FAMILIES", ())
    figures.hangul_family.cache_clear()
    try:
        figures.plot_confusion(np.eye(2, dtype=int), ["a", "b"], tmp_path / "cm.png")
    finally:
        figures.hangul_family.cache_clear()
    assert (tmp_path / "cm.png").exists()
    assert "no Hangul font found (pip install koreanize-matplotlib)" in caplog.text


def test_the_gate_comparison_and_the_reliability_diagram_draw_every_name(tmp_path):
    """The pictures auditors open at each gate: 19 Korean classes, two models, Δ in the title."""
    from pipeline.core.calibration import reliability_bins

    n = len(DACON_CLASSES)
    rng = np.random.default_rng(0)
    f1 = {"champion v3": rng.random(n).tolist(), "candidate v4": rng.random(n).tolist()}
    cms = {k: rng.integers(0, 9, (n, n)) for k in f1}
    fp = tmp_path / "gate" / "comparison.png"
    title = "rejected: ΔwF1 = candidate - champion = -0.0123, 95% CI [-0.03, +0.01], P(ΔwF1 > 0) = 0.210, n = 520"
    assert missing_glyph_warnings(lambda: figures.plot_gate_comparison(DACON_CLASSES, f1, cms, title, fp)) == []
    assert fp.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    probs = rng.dirichlet(np.ones(n), 200)
    labels = rng.integers(0, n, 200)
    bins = reliability_bins(probs, labels)
    panels = {"val (200 images, T fitted here)": {"before": bins, "after": bins, "ece_before": 0.1, "ece_after": 0.05}}
    rel = tmp_path / "reliability.png"
    assert missing_glyph_warnings(lambda: figures.plot_reliability(panels, 1.5, rel)) == []
    assert rel.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
