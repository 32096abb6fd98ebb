"""Saliency figures: map normalization, upscaling for viewing, the grid PNGs, and the sanity and
faithfulness charts (matplotlib, Agg).

Every map is scaled on its own, as the caption states: ``signed`` divides by its largest
absolute value and shows 0 as mid-grey (positive brighter, colour kept); ``abs`` shows the
absolute value (largest over colour channels) from black to white; ``percentile`` clips at
the given percentile of the absolute values first, then shows it signed around grey. A method
whose entry has a colour map (Grad-CAM's: inferno) is non-negative and always shown from 0 to
its maximum in that colour map. Cells smaller than ``min_cell`` pixels are upscaled by a whole
factor, nearest or bicubic.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from allconv_cli.explain.methods import MODEL_FREE, SALIENCY_METHODS
from allconv_cli.explain.targets import class_label

__all__ = ["NORMS", "UPSCALES", "check_display", "draw", "faithfulness_chart", "faithfulness_figure", "grid_figure",
           "normalize", "patches_figure", "render", "saliency_figure", "sanity_chart", "sanity_figure"]

NORMS = ("signed", "abs", "percentile")
UPSCALES = ("nearest", "bicubic")

_DPI = 100  # figure inches -> pixels; sizes below are in pixels
_FONT = 8  # points
_MIN_CELL = 128  # px: smaller images and maps are upscaled by a whole factor to at least this
_MIN_PATCH = 64  # px: the same for receptive-field crops, 2 x top of them per row


def check_display(norm: str, percentile: float, upscale: str):
    """Validate the display options before any work is done."""
    if norm not in NORMS:
        raise ValueError(f"unknown --norm {norm!r}; choose from {', '.join(NORMS)}")
    if not 0 < percentile <= 100:
        raise ValueError(f"--percentile {percentile} must be in (0, 100], e.g. 99.5")
    if upscale not in UPSCALES:
        raise ValueError(f"unknown --upscale {upscale!r}; choose from {', '.join(UPSCALES)}")


def normalize(saliency: torch.Tensor, norm: str = "signed", percentile: float = 99.5) -> np.ndarray:
    """A map (C, H, W) -> an RGB image (H, W, 3) in [0, 1], scaled as ``norm`` says."""
    m = saliency.detach().float().cpu().numpy()
    if norm == "abs":
        m = np.abs(m).max(0, keepdims=True)  # (1, H, W)
        top = m.max()
        shown = m / top if top > 0 else m
    else:
        top = np.abs(m).max()
        if norm == "percentile":
            clip = np.percentile(np.abs(m), percentile)
            top = clip if clip > 0 else top  # a map that is zero almost everywhere: plain max
            m = np.clip(m, -top, top)
        shown = 0.5 + 0.5 * (m / top if top > 0 else m)
    return _rgb(shown)


def heat(cam: torch.Tensor, colormap: str = "inferno") -> np.ndarray:
    """A non-negative map (C, H, W) -> RGB (H, W, 3) in ``colormap``, 0 to its maximum (the
    largest over channels where C > 1)."""
    from matplotlib import colormaps

    m = cam.detach().float().cpu().numpy().max(0)
    top = m.max()
    return colormaps[colormap](m / top if top > 0 else m)[..., :3]


def draw(method: str, saliency: torch.Tensor, norm: str = "signed", percentile: float = 99.5) -> np.ndarray:
    """One map (C, H, W) of ``method`` -> RGB (H, W, 3), as its entry says: in its colour map, or
    scaled by ``norm``."""
    colormap = SALIENCY_METHODS[method].colormap
    return normalize(saliency, norm, percentile) if colormap is None else heat(saliency, colormap)


def _method_notes(methods, layer: str | None, norm: str, percentile: float) -> list[str]:
    """What a caption says of how ``methods`` were computed and drawn: the layer those that weigh
    one weighed, each colour map, and the --norm of the others."""
    entries = [SALIENCY_METHODS[m] for m in methods]
    notes = []
    weighing = [e.title for e in entries if e.needs_layer]
    if weighing and layer is not None:
        notes.append(f"{' and '.join(weighing)} on {layer}'s maps")
    notes += [f"{e.title} 0 to max ({e.colormap})" for e in entries if e.colormap is not None]
    if any(e.colormap is None for e in entries):
        notes.append(norm_text(norm, percentile))
    return notes


def picture(image: torch.Tensor) -> np.ndarray:
    """An image (C, H, W) in [0, 1] -> RGB (H, W, 3)."""
    return _rgb(image.detach().float().cpu().numpy())


def _rgb(chw: np.ndarray) -> np.ndarray:
    hwc = np.clip(chw, 0, 1).transpose(1, 2, 0)
    return np.repeat(hwc, 3, axis=2) if hwc.shape[2] == 1 else hwc


def norm_text(norm: str, percentile: float) -> str:
    return {
        "signed": "maps: each divided by its max |value|, 0 = grey (signed)",
        "abs": "maps: |value| (max over colour channels), each divided by its max, black = 0 (abs)",
        "percentile": f"maps: each clipped at the {percentile:g}th percentile of |value|, then signed, "
                      "0 = grey (percentile)",
    }[norm]


def render(
    rows: Sequence[Sequence[np.ndarray]],
    row_titles: Sequence[str],
    groups: Sequence[tuple[str, int]],
    caption: str,
    upscale: str = "nearest",
    min_cell: int = _MIN_CELL,
) -> bytes:
    """Lay out equal-size RGB cells (H, W, 3) in a grid -> PNG bytes (see ``grid_figure``)."""
    buffer = io.BytesIO()
    grid_figure(rows, row_titles, groups, caption, upscale, min_cell).savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def grid_figure(
    rows: Sequence[Sequence[np.ndarray]],
    row_titles: Sequence[str],
    groups: Sequence[tuple[str, int]],
    caption: str,
    upscale: str = "nearest",
    min_cell: int = _MIN_CELL,
):
    """Lay out equal-size RGB cells (H, W, 3) in a grid -> a matplotlib Figure, sized so that
    every title and the caption (wrapped to its width) lie inside it.

    ``groups`` are (title, number of columns) from left to right; a wider gap separates them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measure = _Measure()
    height, width = rows[0][0].shape[:2]
    factor = _factor(height, width, min_cell)
    resample = Image.Resampling.NEAREST if upscale == "nearest" else Image.Resampling.BICUBIC
    cell_h, cell_w = height * factor, width * factor
    gap, group_gap = 2, 12
    left = max(60, math.ceil(max(measure(title, _FONT)[0] for title in row_titles)) + 16)
    starts, x = [], left  # left edge of each group, px
    for title, n in groups:
        span = n * cell_w + (n - 1) * gap
        extra = max(0, measure(title, _FONT + 1)[0] + 4 - span)  # a title wider than its cells
        x += extra / 2
        starts.append(x)
        x += span + extra / 2 + group_gap
    fig_w = math.ceil(x - group_gap + 10)
    starts = [round(x0) for x0 in starts]
    caption = measure.wrap(caption, _FONT, fig_w - 16)
    top, bottom = 24, 14 + math.ceil(measure(caption, _FONT)[1])
    fig_h = top + len(rows) * cell_h + (len(rows) - 1) * gap + bottom

    # One canvas of pixels, placed 1:1 in the figure: no resampling by matplotlib.
    canvas = np.full((fig_h, fig_w, 3), 255, np.uint8)
    for r, cells in enumerate(rows):
        y = top + r * (cell_h + gap)
        cells = iter(cells)
        for (_, n), x0 in zip(groups, starts):
            for j in range(n):
                cell = Image.fromarray((next(cells) * 255).round().astype(np.uint8))
                x = x0 + j * (cell_w + gap)
                canvas[y:y + cell_h, x:x + cell_w] = np.asarray(cell.resize((cell_w, cell_h), resample))
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.figimage(canvas, 0, 0, origin="upper")
    for r, title in enumerate(row_titles):
        y = top + r * (cell_h + gap) + cell_h / 2
        fig.text((left - 8) / fig_w, 1 - y / fig_h, title, ha="right", va="center", fontsize=_FONT)
    for (title, n), x0 in zip(groups, starts):
        center = x0 + (n * cell_w + (n - 1) * gap) / 2
        fig.text(center / fig_w, 1 - (top - 6) / fig_h, title, ha="center", va="bottom", fontsize=_FONT + 1)
    fig.text(8 / fig_w, (bottom - 8) / fig_h, caption, ha="left", va="top", fontsize=_FONT)
    return fig


class _Measure:
    """Pixel extents of text as the Agg renderer draws it at ``_DPI``: for layouts that never cut
    a caption or a title off, whatever the figure's width."""

    def __init__(self):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.figure = Figure(dpi=_DPI)
        self.renderer = FigureCanvasAgg(self.figure).get_renderer()

    def __call__(self, text: str, size: float) -> tuple[float, float]:
        """(width, height) in px of ``text`` (lines split at newlines)."""
        artist = self.figure.text(0, 0, text, fontsize=size)
        box = artist.get_window_extent(self.renderer)
        artist.remove()
        return box.width, box.height

    def wrap(self, text: str, size: float, width: float) -> str:
        """``text`` broken into lines of at most ``width`` px at spaces, or inside a word that
        alone is wider."""
        lines, line = [], ""
        for word in text.split():
            while self(word, size)[0] > width and len(word) > 1:
                cut = max(k for k in range(1, len(word) + 1) if k == 1 or self(word[:k], size)[0] <= width)
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = f"{line} {word}" if line else word
            if line and self(candidate, size)[0] > width:
                lines.append(line)
                candidate = word
            line = candidate
        return "\n".join(lines + [line] if line else lines)


def _factor(height: int, width: int, min_cell: int) -> int:
    return max(1, math.ceil(min_cell / max(height, width)))


def upscale_text(height: int, width: int, upscale: str, min_cell: int) -> str:
    factor = _factor(height, width, min_cell)
    if factor == 1:
        return f"cells at {width}x{height} px, not upscaled"
    return f"cells upscaled {factor}x ({upscale}) from {width}x{height} px"


def saliency_figure(explanation, norm: str = "signed", percentile: float = 99.5,
                    upscale: str = "nearest") -> bytes:
    """The grid of an ``Explanation``: a row per target, the input then one column per method."""
    check_display(norm, percentile, upscale)
    e, loaded = explanation, explanation.loaded
    rows, titles = [], []
    for i, t in enumerate(e.targets):
        cells = [draw(method, m[i], norm, percentile) for method, m in e.maps.items()]
        rows.append([picture(e.images[t.image]), *cells])
        if t.layer is None:
            what = f"{class_label(loaded.classes, t.channel)}\nlogit {t.value:.3g}"
        else:
            what = f"{t.layer} ch {t.channel} @ ({t.y}, {t.x})\nact {t.value:.3g}"
        titles.append(f"{_short(Path(e.paths[t.image]).name)}\n{what}")
    groups = [("input", 1), *((SALIENCY_METHODS[m].title, 1) for m in e.maps)]
    parts = [f"{loaded.name}, weights {loaded.source}", f"signal from {e.selection}",
             *_method_notes(e.maps, e.layer, norm, percentile), "gradients w.r.t. the preprocessed input",
             upscale_text(*e.images.shape[2:], upscale, _MIN_CELL)]
    return render(rows, titles, groups, " · ".join(parts), upscale, _MIN_CELL)


def patches_figure(result, loaded, dataset: str, norm: str = "signed", percentile: float = 99.5,
                   upscale: str = "nearest") -> bytes:
    """The paper's Fig. 3 for a ``TopPatches``: a row per filter, its top patches then each
    method's reconstructions, all cropped to the receptive field."""
    check_display(norm, percentile, upscale)
    k = result.values.shape[1]
    rows, titles = [], []
    for s, channel in enumerate(result.channels):
        maps = [draw(method, m[s, j], norm, percentile) for method, m in result.maps.items() for j in range(k)]
        rows.append([*(picture(p) for p in result.patches[s]), *maps])
        titles.append(f"{result.layer} filter {channel}\nmax {result.values[s, 0].item():.3g}")
    groups = [(f"top-{k} patches", k), *((SALIENCY_METHODS[m].title, k) for m in result.maps)]
    rf = result.field
    parts = [f"{loaded.name}, weights {loaded.source}",
             f"{result.layer}: per filter the {k} of {result.scanned} {dataset} images whose best neuron "
             f"fires most, cropped to its {rf.size[0]}x{rf.size[1]} receptive field (grey: outside the image)",
             *_method_notes(result.maps, result.layer, norm, percentile),
             upscale_text(*result.patches.shape[3:], upscale, _MIN_PATCH)]
    return render(rows, titles, groups, " · ".join(parts), upscale, _MIN_PATCH)


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[:limit - 3] + "..."


def sanity_figure(result, method: str, loaded, norm: str = "abs", percentile: float = 99.5,
                  upscale: str = "nearest") -> bytes:
    """One method's maps of a ``SanityResult``: a row per image, the input, the trained model's
    map, then each stage's map."""
    check_display(norm, percentile, upscale)
    maps = result.maps[method]  # (1 + stages, N, C, H, W)
    rows, titles = [], []
    for i, t in enumerate(result.targets):
        rows.append([picture(result.images[t.image]), *(draw(method, m[i], norm, percentile) for m in maps)])
        what = class_label(loaded.classes, t.channel) if t.layer is None else f"{t.layer} ch {t.channel} @ ({t.y}, {t.x})"
        titles.append(f"{_short(Path(result.paths[t.image]).name)}\n{what}")
    groups = [("input", 1), ("trained", 1), *((name, 1) for name in result.stage_names)]
    if result.mode == "against":
        how = f"right: the maps of {result.stage_names[0][len('against '):]}"
    else:
        how = (f"{result.mode} randomization (seed {result.seed}): "
               + ("from the top layer down to the one named, re-initialized" if result.mode == "cascade"
                  else "only the layer named re-initialized"))
    parts = [f"{SALIENCY_METHODS[method].title} · {loaded.name}, weights {loaded.source}", how,
             f"signal from {result.selection}", *_method_notes([method], result.layer, norm, percentile),
             upscale_text(*result.images.shape[2:], upscale, _MIN_CELL)]
    return render(rows, titles, groups, " · ".join(parts), upscale, _MIN_CELL)


SANITY_METRIC_TITLES = {"spearman_abs": "Spearman rank correlation, |map|",
                        "spearman_signed": "Spearman rank correlation, signed map",
                        "ssim": "SSIM of |map| (scaled to [0, 1])"}


def sanity_chart(result, title: str) -> bytes:
    """Similarity to the trained model's map against stage: a panel per metric, a line per
    method, each point the mean over images (a stage where no image has a defined value is
    left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.table()
    names = ["trained", *result.stage_names]
    fig = Figure(figsize=(4.2 * len(SANITY_METRIC_TITLES), 3.8), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(SANITY_METRIC_TITLES), sharey=True)
    for ax, (metric, metric_title) in zip(axes, SANITY_METRIC_TITLES.items()):
        for method in result.maps:
            values = [1.0] + [next(r[metric] for r in rows if r["method"] == method and r["stage"] == name)
                              for name in result.stage_names]
            ys = [math.nan if v is None else v for v in values]
            ax.plot(range(len(names)), ys, marker="o", markersize=3, label=SALIENCY_METHODS[method].title)
        ax.set_title(metric_title, fontsize=_FONT + 1)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=_FONT)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_ylim(top=1.05)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="y", labelsize=_FONT)
    axes[0].set_ylabel("similarity to the trained model's map", fontsize=_FONT)
    axes[-1].legend(fontsize=_FONT, loc="upper right")
    xlabel = {"cascade": "re-initialized from the top down to", "independent": "re-initialized layer",
              "against": "compared model"}[result.mode]
    for ax in axes:
        ax.set_xlabel(xlabel, fontsize=_FONT)
    fig.suptitle(title, fontsize=_FONT + 1)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


_FAITHFULNESS_PANELS = {"deletion": "deletion (lower is better)", "insertion": "insertion (higher is better)",
                        "road_morf": "ROAD, most relevant first (lower is better)",
                        "road_lerf": "ROAD, least relevant first (higher is better)"}


def faithfulness_figure(result, title: str):
    """The mean curve over images of every method of a ``FaithfulnessResult``, a panel per metric,
    under ``title`` -> a matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(_FAITHFULNESS_PANELS), 3.8), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(_FAITHFULNESS_PANELS), sharey=True)
    rows = {row["method"]: row for row in result.table()}
    for ax, (metric, panel) in zip(axes, _FAITHFULNESS_PANELS.items()):
        for method in result.methods:
            style = {} if method not in MODEL_FREE else \
                dict(linestyle="--", color="grey" if method == "random" else "black")
            name = SALIENCY_METHODS[method].title if method in SALIENCY_METHODS else f"{method} map"
            ax.plot([100 * x for x in result.positions(metric)], result.curves[method][metric].mean(0).tolist(),
                    marker="o", markersize=2.5, label=f"{name} ({rows[method][metric]:.3f})", **style)
        ax.set_title(panel, fontsize=_FONT + 1)
        ax.set_xlabel("pixels inserted (%)" if metric == "insertion" else "pixels removed (%)", fontsize=_FONT)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=_FONT)
        ax.legend(fontsize=_FONT - 1, title="AUC" if metric in ("deletion", "insertion") else "mean",
                  title_fontsize=_FONT - 1)
    axes[0].set_ylabel("probability of the explained class, mean over images", fontsize=_FONT)
    fig.suptitle(title, fontsize=_FONT + 1)
    return fig


def faithfulness_chart(result, title: str) -> bytes:
    """``faithfulness_figure`` as PNG bytes."""
    buffer = io.BytesIO()
    faithfulness_figure(result, title).savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
