"""Every picture the pipeline draws goes through here, so class names in Hangul render as text, not boxes.

    with hangul_figure((6, 5)) as (fig, ax):
        ax.set_title("곰팡이")
        fig.savefig("plot.png")

matplotlib's bundled fonts have no Hangul and the machines we run on have no CJK font, so without help every
Korean class name draws as empty boxes (matplotlib warns "Glyph … missing from font(s) DejaVu Sans"). We
register NanumGothic, bundled by the PyPI package ``koreanize-matplotlib``, with matplotlib's font manager and
name it in each figure's settings. We read only the package's font file and never import the package: its import
changes matplotlib's global settings and needs ``distutils``, which Python 3.12 dropped.

matplotlib is imported inside the functions: the core must import on a bare GPU box without it.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_logger = logging.getLogger(__name__)
FONT_DISTRIBUTION = "koreanize-matplotlib"
FONT_FILE = "koreanize_matplotlib/fonts/NanumGothic.ttf"
# Installed Hangul fonts tried when the bundled one is missing (Debian fonts-nanum / fonts-noto-cjk, Windows, macOS).
SYSTEM_HANGUL_FAMILIES = ("NanumGothic", "Noto Sans CJK KR", "Noto Sans KR", "Malgun Gothic", "AppleGothic")
FALLBACK_FAMILY = "DejaVu Sans"  # matplotlib's own font, for any glyph the Hangul font lacks


def bundled_font_file() -> Path | None:
    """NanumGothic.ttf from the ``koreanize-matplotlib`` distribution's files, or None when not installed."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(FONT_DISTRIBUTION).locate_file(FONT_FILE))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


@functools.cache
def hangul_family() -> str | None:
    """Register a Hangul-capable font with matplotlib (once per process); return its family name, or None."""
    from matplotlib import font_manager

    font_file = bundled_font_file()
    if font_file is not None:
        font_manager.fontManager.addfont(str(font_file))
        return font_manager.FontProperties(fname=str(font_file)).get_name()
    installed = {f.name for f in font_manager.fontManager.ttflist}
    family = next((f for f in SYSTEM_HANGUL_FAMILIES if f in installed), None)
    if family is None:
        _logger.warning("no Hangul font found (pip install %s): Korean labels will draw as boxes",
                        FONT_DISTRIBUTION)
    return family


@contextmanager
def hangul_figure(figsize: tuple[float, float]) -> Iterator[tuple[object, object]]:
    """A fresh ``(Figure, Axes)`` on the Agg canvas whose text uses the Hangul font.

    The font is set for the ``with`` block only (matplotlib reads it when it draws text), so draw and save inside
    it; nothing global is changed and no pyplot state is kept, so there is nothing to close.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    family = hangul_family()
    settings = {"font.family": [family, FALLBACK_FAMILY] if family else [FALLBACK_FAMILY],
                "axes.unicode_minus": False}  # NanumGothic has no U+2212: a hyphen keeps tick labels in one font
    with matplotlib.rc_context(settings):
        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        yield fig, fig.add_subplot()


def plot_confusion(cm: np.ndarray, names: list[str], png_fp: Path) -> None:
    """The confusion matrix as a PNG (rows true, columns predicted), class names as tick labels."""
    n = len(names)
    with hangul_figure((1 + 0.5 * n, 1 + 0.45 * n)) as (fig, ax):
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.tight_layout()
        png_fp.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_fp, dpi=100)
