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
# "given → suggested" in captions: NanumGothic's U+2192 (→) draws only its arrowhead, like a stray comma; ⇒ is whole.
ARROW = "⇒"


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
        _logger.warning("no Hangul font found (pip install %s): Korean labels will draw as boxes", FONT_DISTRIBUTION)
    return family


@contextmanager
def hangul_figure(figsize: tuple[float, float], ncols: int = 1) -> Iterator[tuple[object, object]]:
    """A fresh ``(Figure, Axes)`` on the Agg canvas whose text uses the Hangul font.

    The font is set for the ``with`` block only (matplotlib reads it when it draws text), so draw and save inside
    it; nothing global is changed and no pyplot state is kept, so there is nothing to close. With ``ncols`` > 1
    the second item is a list of that many side-by-side Axes.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    family = hangul_family()
    settings = {
        "font.family": [family, FALLBACK_FAMILY] if family else [FALLBACK_FAMILY],
        "axes.unicode_minus": False,
    }  # NanumGothic has no U+2212: a hyphen keeps tick labels in one font
    with matplotlib.rc_context(settings):
        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        yield fig, (fig.add_subplot() if ncols == 1 else list(fig.subplots(1, ncols)))


def plot_confusion(cm: np.ndarray, names: list[str], png_fp: Path) -> None:
    """The confusion matrix as a PNG (rows true, columns predicted), class names as tick labels."""
    n = len(names)
    with hangul_figure((1 + 0.5 * n, 1 + 0.45 * n)) as (fig, ax):
        draw_confusion(ax, cm, names)
        fig.tight_layout()
        _save(fig, png_fp)


def draw_confusion(ax, cm: np.ndarray, names: list[str], title: str = "") -> None:
    """One confusion matrix on ``ax``: rows true, columns predicted, counts written in the cells."""
    n = len(names)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    # White text on the darkest cells, so a count stays readable whatever the colour under it.
    dark = 0.6 * (cm.max() if cm.size else 0)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > dark > 0 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)


def _save(fig, png_fp: Path) -> None:
    png_fp.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_fp, dpi=100, bbox_inches="tight")  # rotated tick labels and outside legends stay in


def plot_gate_comparison(
    names: list[str], f1: dict[str, list[float]], confusion: dict[str, np.ndarray], title: str, png_fp: Path
) -> None:
    """What the gate compared: per-class F1 of each model side by side, then each model's confusion matrix.

    ``f1`` and ``confusion`` are keyed by model label (e.g. ``"champion v3"``, ``"candidate v4"``), in drawing
    order; a first candidate with no champion has one entry each.
    """
    n, models = len(names), list(f1)
    side = 2.5 + 0.45 * n
    with hangul_figure((side * (1 + len(models)) + 1.5, side + 1.2), ncols=1 + len(models)) as (fig, axes):
        ax = axes[0]
        height = 0.8 / len(models)
        for k, model in enumerate(models):
            ys = np.arange(n) + (k - (len(models) - 1) / 2) * height
            ax.barh(
                ys, f1[model], height=height, label=model, color="#1f77b4" if k == len(models) - 1 else "#9e9e9e"
            )  # the candidate (last) in blue
            for y, v in zip(ys, f1[model]):
                ax.text(min(v, 1.0) + 0.01, y, f"{v:.2f}", va="center", fontsize=7)
        ax.set_yticks(range(n), names)
        ax.invert_yaxis()  # first class on top, as in the confusion matrices
        ax.set_xlim(0, 1.15)
        ax.set_xlabel("F1 on the test split")
        ax.set_title("per-class F1", fontsize=10)
        # under the axes: inside, the legend would cover the bars (and their values) of the last class
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(models), fontsize=8, frameon=False)
        for ax, model in zip(axes[1:], models):
            draw_confusion(ax, confusion[model], names, title=model)
        fig.suptitle(title, fontsize=13)
        fig.tight_layout()
        _save(fig, png_fp)


def plot_reliability(panels: dict[str, dict], temperature: float, png_fp: Path) -> None:
    """Reliability diagrams: accuracy against confidence per bin, before and after temperature scaling.

    ``panels`` maps a title (e.g. ``"val (T fitted here)"``) to ``{"before": bins, "after": bins, "ece_before":
    x, "ece_after": y}`` with ``bins`` from :func:`pipeline.core.calibration.reliability_bins`.
    """
    with hangul_figure((5.2 * len(panels), 5), ncols=len(panels)) as (fig, axes):
        axes = axes if isinstance(axes, list) else [axes]
        for ax, (title, panel) in zip(axes, panels.items()):
            ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="perfect")
            for key, colour, name in (
                ("before", "#d62728", "before"),
                ("after", "#1f77b4", f"after T={temperature:.2f}"),
            ):
                bins = panel[key]
                pts = [(c, a, n) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"]) if n]
                if pts:
                    xs, ys, ns = zip(*pts)
                    ax.plot(xs, ys, marker="o", color=colour, label=f"{name} (ECE {panel[f'ece_{key}']:.3f})")
                    # marker area and label = images in the bin: a wild point may rest on one image
                    ax.scatter(xs, ys, s=[12 + 240 * k / max(ns) for k in ns], color=colour, alpha=0.3)
                    for x, y, k in pts:
                        ax.annotate(
                            str(k), (x, y), xytext=(4, -9), textcoords="offset points", fontsize=6, color=colour
                        )
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("confidence (mean of the bin)")
            ax.set_ylabel("accuracy")
            ax.set_title(title + "\n(numbers: images per bin)", fontsize=10)
            ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        _save(fig, png_fp)


def plot_label_issue_grid(suspects: dict[str, list[tuple[np.ndarray, str]]], title: str, png_fp: Path) -> None:
    """The top suspects of each given class: one row per class, thumbnails captioned "given ⇒ suggested".

    ``suspects`` maps a given class name to ``(H×W×3 uint8 thumbnail, caption)`` pairs, most suspect first.
    A run with no suspects still draws a one-line figure that says so, so the artefact always exists.
    """
    rows = {c: items for c, items in suspects.items() if items}
    ncols = max((len(items) for items in rows.values()), default=1)
    with hangul_figure((1.9 * ncols + 1.6, 2.1 * max(len(rows), 1) + 0.6)) as (fig, _ax):
        fig.delaxes(_ax)
        if not rows:
            fig.text(0.5, 0.5, "no label issues flagged", ha="center", va="center", fontsize=12)
        for r, (name, items) in enumerate(rows.items()):
            for c in range(ncols):
                ax = fig.add_subplot(len(rows), ncols, r * ncols + c + 1)
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(items):
                    thumb, caption = items[c]
                    ax.imshow(thumb)
                    ax.set_title(caption, fontsize=8)
                else:
                    ax.axis("off")
                if c == 0:
                    ax.set_ylabel(name, fontsize=10, rotation=0, ha="right", va="center")
        height = fig.get_size_inches()[1]
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / height)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))  # the title gets its own band above the first captions
        _save(fig, png_fp)
