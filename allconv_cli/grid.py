"""Saliency figures: map normalization, upscaling for viewing, and the grid PNG (matplotlib, Agg).

Every map is scaled on its own, as the caption states: ``signed`` divides by its largest
absolute value and shows 0 as mid-grey (positive brighter, colour kept); ``abs`` shows the
absolute value (largest over colour channels) from black to white; ``percentile`` clips at
the given percentile of the absolute values first, then shows it signed around grey. Grad-CAM
maps are non-negative and always shown from 0 to their maximum in the inferno colour map.
Cells smaller than ``min_cell`` pixels are upscaled by a whole factor, nearest or bicubic.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from allconv_cli.saliency import CLASS_METHODS, class_label

__all__ = ["NORMS", "UPSCALES", "check_display", "normalize", "patches_figure", "render", "saliency_figure"]

NORMS = ("signed", "abs", "percentile")
UPSCALES = ("nearest", "bicubic")
METHOD_TITLES = {"backprop": "backpropagation", "deconvnet": "deconvnet", "guided": "guided backprop",
                 "gradcam": "Grad-CAM", "guided-gradcam": "guided Grad-CAM"}

_DPI = 100  # figure inches -> pixels; sizes below are in pixels
_FONT = 8  # points
_CHAR, _LINE = 7, 12  # px per character (DejaVu Sans, wide side) and per line at _FONT and _DPI
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


def heat(cam: torch.Tensor) -> np.ndarray:
    """A non-negative map (1, H, W) -> inferno RGB (H, W, 3), 0 to its maximum."""
    from matplotlib import colormaps

    m = cam.detach().float().cpu().numpy()[0]
    top = m.max()
    return colormaps["inferno"](m / top if top > 0 else m)[..., :3]


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
    """Lay out equal-size RGB cells (H, W, 3) in a grid -> PNG bytes.

    ``groups`` are (title, number of columns) from left to right; a wider gap separates them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    height, width = rows[0][0].shape[:2]
    factor = _factor(height, width, min_cell)
    resample = Image.Resampling.NEAREST if upscale == "nearest" else Image.Resampling.BICUBIC
    cell_h, cell_w = height * factor, width * factor
    gap, group_gap = 2, 12
    lines = [line for title in row_titles for line in title.splitlines()]
    left = max(60, _CHAR * max(map(len, lines)) + 16)
    starts, x = [], left  # left edge of each group, px
    for _, n in groups:
        starts.append(x)
        x += n * cell_w + (n - 1) * gap + group_gap
    fig_w = x - group_gap + 10
    caption_lines = textwrap.wrap(caption, width=(fig_w - 16) // _CHAR)
    top, bottom = 24, 14 + _LINE * len(caption_lines)
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
    fig.text(8 / fig_w, (bottom - 8) / fig_h, "\n".join(caption_lines), ha="left", va="top", fontsize=_FONT)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _factor(height: int, width: int, min_cell: int) -> int:
    return max(1, math.ceil(min_cell / max(height, width)))


def upscale_text(height: int, width: int, upscale: str, min_cell: int) -> str:
    factor = _factor(height, width, min_cell)
    if factor == 1:
        return f"cells at {width}x{height} px, not upscaled"
    return f"cells upscaled {factor}x ({upscale}) from {width}x{height} px"


def _cells(maps: dict[str, torch.Tensor], index, norm: str, percentile: float) -> list[np.ndarray]:
    return [heat(m[index]) if method == "gradcam" else normalize(m[index], norm, percentile)
            for method, m in maps.items()]


def saliency_figure(explanation, norm: str = "signed", percentile: float = 99.5,
                    upscale: str = "nearest") -> bytes:
    """The grid of an ``Explanation``: a row per target, the input then one column per method."""
    check_display(norm, percentile, upscale)
    e, loaded = explanation, explanation.loaded
    rows, titles = [], []
    for i, t in enumerate(e.targets):
        rows.append([picture(e.images[t.image]), *_cells(e.maps, i, norm, percentile)])
        if t.layer is None:
            what = f"{class_label(loaded.classes, t.channel)}\nlogit {t.value:.3g}"
        else:
            what = f"{t.layer} ch {t.channel} @ ({t.y}, {t.x})\nact {t.value:.3g}"
        titles.append(f"{_short(Path(e.paths[t.image]).name)}\n{what}")
    groups = [("input", 1), *((METHOD_TITLES[m], 1) for m in e.maps)]
    parts = [f"{loaded.name}, weights {loaded.source}", f"signal from {e.selection}"]
    if any(m in CLASS_METHODS for m in e.maps):
        parts.append(f"Grad-CAM on {e.layer}'s maps, 0 to max (inferno)")
    parts.append(norm_text(norm, percentile) + "; gradients w.r.t. the preprocessed input")
    parts.append(upscale_text(*e.images.shape[2:], upscale, _MIN_CELL))
    return render(rows, titles, groups, " · ".join(parts), upscale, _MIN_CELL)


def patches_figure(result, loaded, dataset: str, norm: str = "signed", percentile: float = 99.5,
                   upscale: str = "nearest") -> bytes:
    """The paper's Fig. 3 for a ``TopPatches``: a row per filter, its top patches then each
    method's reconstructions, all cropped to the receptive field."""
    check_display(norm, percentile, upscale)
    k = result.values.shape[1]
    rows, titles = [], []
    for s, channel in enumerate(result.channels):
        maps = [normalize(m[s, j], norm, percentile) for m in result.maps.values() for j in range(k)]
        rows.append([*(picture(p) for p in result.patches[s]), *maps])
        titles.append(f"{result.layer} filter {channel}\nmax {result.values[s, 0].item():.3g}")
    groups = [(f"top-{k} patches", k), *((METHOD_TITLES[m], k) for m in result.maps)]
    rf = result.field
    parts = [f"{loaded.name}, weights {loaded.source}",
             f"{result.layer}: per filter the {k} of {result.scanned} {dataset} images whose best neuron "
             f"fires most, cropped to its {rf.size[0]}x{rf.size[1]} receptive field (grey: outside the image)",
             norm_text(norm, percentile), upscale_text(*result.patches.shape[3:], upscale, _MIN_PATCH)]
    return render(rows, titles, groups, " · ".join(parts), upscale, _MIN_PATCH)


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[:limit - 3] + "..."
