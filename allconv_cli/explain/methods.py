"""The saliency methods: one table, an entry per method carrying all that allconv needs to know of
it (how it computes, how it is drawn, what it needs). ``saliency`` computes every entry,
``figures`` titles and draws it, ``faithfulness`` scores it, ``sanity`` randomizes it, ``scan``
reconstructs patches with it, and the commands' help and validation list it from here.

Torch-free data, so that the command line lists and checks the names without importing torch:
an entry names its function as ``"module:function"`` (the built-in ones live in
``explain.maps``), imported when the first map is computed, or holds the function itself. A new
method is one entry and its function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A saliency method. ``compute(model, x, rows, layer)`` gets model inputs ``x`` (N, C, H, W),
    one ``targets.Target`` per row of ``x``, and the layer to weigh (``needs_layer``; else None),
    and returns one map per row, (N, C, H, W) or (N, 1, H, W), as a tensor on ``x``'s device; it
    leaves the model as it found it (no hooks, same parameters, gradients and mode)."""

    title: str  # in figures, charts and legends
    compute: str | Callable  # "module:function", imported on first use, or the function itself
    needs_class: bool = False  # explains a class logit (--class), not a neuron
    needs_layer: bool = False  # weighs a layer's maps (--layer; default: the last conv layer)
    colormap: str | None = None  # a non-negative map, drawn 0 to max in this matplotlib colormap; None: by --norm
    paper: bool = False  # one of the paper's three (Section 3.4): visualize's default

    def function(self) -> Callable:
        """The function that computes the maps."""
        if callable(self.compute):
            return self.compute
        module, name = self.compute.split(":")
        return getattr(importlib.import_module(module), name)


_MAPS = "allconv_cli.explain.maps"
SALIENCY_METHODS: dict[str, Method] = {
    "backprop": Method("backpropagation", f"{_MAPS}:backprop", paper=True),
    "deconvnet": Method("deconvnet", f"{_MAPS}:deconvnet", paper=True),
    "guided": Method("guided backprop", f"{_MAPS}:guided", paper=True),
    "gradcam": Method("Grad-CAM", f"{_MAPS}:gradcam", needs_class=True, needs_layer=True, colormap="inferno"),
    "guided-gradcam": Method("guided Grad-CAM", f"{_MAPS}:guided_gradcam", needs_class=True, needs_layer=True),
}

# Maps that know nothing of the model, which ``faithfulness`` scores beside the methods as
# references (``perturbation.model_free_map`` computes them): name -> what it is.
MODEL_FREE = {"random": "uniform noise", "sobel": "the image's edges"}

# The names as the table holds them when the command line reads it (its help texts). The
# library reads SALIENCY_METHODS itself each time, so an entry added later counts everywhere.
METHODS = tuple(SALIENCY_METHODS)
PAPER_METHODS = tuple(name for name, method in SALIENCY_METHODS.items() if method.paper)
CLASS_METHODS = tuple(name for name, method in SALIENCY_METHODS.items() if method.needs_class)


def fitting(by_class: bool) -> tuple[str, ...]:
    """Every method that explains a class score (``by_class``) or a neuron (the rest)."""
    return tuple(name for name, method in SALIENCY_METHODS.items() if by_class or not method.needs_class)
