"""Saliency maps for a batch of images and the neurons or class logits chosen for them, by any
method of the table ``methods.SALIENCY_METHODS``: the paper's three backward rules (section 3.4)
and, beyond the paper, Grad-CAM and guided Grad-CAM (``maps`` computes them). ``backprop`` and
Grad-CAM are plain gradients and work on any model; ``deconvnet`` and ``guided`` refuse a model
with activations other than ReLU. Maps are gradients with respect to the model's input, i.e.
after preprocessing, with the shape of that input (B, C, H, W), or (B, 1, H, W).

Typical use::


    loaded = load_checkpoint()        # the bundled All-CNN-C trained on CIFAR-10
    result = explain(loaded, ["cat.jpg"], layer="conv6", methods=["guided"])
    result.maps["guided"]               # (1, 3, 32, 32): the max neuron of conv6
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from allconv_cli.device import autocast, resolve_precision
from allconv_cli.explain.methods import PAPER_METHODS, SALIENCY_METHODS
from allconv_cli.explain.targets import (
    Target,
    class_index,
    class_label,
    default_layer,
    get_layer,
    select_targets,
)
from allconv_cli.files.loading import LoadedModel
from allconv_cli.files.raw_maps import write_raw_maps
from allconv_cli.util import did_you_mean

__all__ = ["Explanation", "check_methods", "explain", "saliency_maps"]


_ROWS_PER_PASS = 64  # rows per forward/backward pass: bounds memory on long scans


def saliency_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[Target],
    method: str = "guided",
    cam_layer: str | None = None,
) -> torch.Tensor:
    """One map per target, computed on ``inputs[target.image]`` (model inputs, (B, C, H, W)) by
    the entry ``method`` of ``SALIENCY_METHODS``: (N, C, H, W), or (N, 1, H, W) for Grad-CAM. A
    method that weighs a layer's maps weighs ``cam_layer``'s (default: the last conv layer); one
    that explains a class needs class targets. The model is left as it was: no hooks, same
    parameters and gradients, same train/eval mode.
    """
    name = check_methods([method])[0]
    method = SALIENCY_METHODS[name]
    if not targets:
        raise ValueError("no targets: select_targets chooses them")
    layers = {t.layer for t in targets}
    if len(layers) > 1:
        raise ValueError(f"targets mix layers {sorted(map(str, layers))}; compute them separately")
    if method.needs_class and targets[0].layer is not None:
        raise ValueError(f"{name} explains a class score: select the targets with --class NAME, INDEX or predicted")
    layer = (cam_layer or default_layer(model)) if method.needs_layer else None
    compute = method.function()
    chunks = []
    for start in range(0, len(targets), _ROWS_PER_PASS):
        rows = targets[start:start + _ROWS_PER_PASS]
        x = inputs[[t.image for t in rows]]
        maps = compute(model, x, rows, layer)
        if maps.dim() != 4 or len(maps) != len(x) or maps.shape[1] not in (1, x.shape[1]) \
                or maps.shape[2:] != x.shape[2:]:
            raise ValueError(f"method {name} returned maps of shape {tuple(maps.shape)} for inputs "
                             f"{tuple(x.shape)}: one (C or 1, H, W) map per input")
        chunks.append(maps)
    return torch.cat(chunks)


def check_methods(methods: Iterable[str]) -> tuple[str, ...]:
    """Validate method names (the names of SALIENCY_METHODS); duplicates are dropped, order kept."""
    methods = tuple(dict.fromkeys(m.strip() for m in methods if m.strip()))
    for method in methods:
        if method not in SALIENCY_METHODS:
            raise ValueError(f"unknown method {method!r}{did_you_mean(method, SALIENCY_METHODS)}; "
                             f"choose from {', '.join(SALIENCY_METHODS)}")
    if not methods:
        raise ValueError(f"no method given; choose from {', '.join(SALIENCY_METHODS)}")
    return methods


@dataclass
class Explanation:
    """Maps for a batch of images: one row per target, one map per method."""

    loaded: LoadedModel
    paths: list[str]
    images: torch.Tensor  # (B, C, H, W) in [0, 1]: what the model was shown, before preprocessing
    inputs: torch.Tensor  # (B, C, H, W): after preprocessing, the tensor the maps are gradients for
    layer: str  # the neuron's layer, or for class targets Grad-CAM's layer
    selection: str  # how the targets were chosen, in words
    targets: list[Target]
    maps: dict[str, torch.Tensor]  # method -> (N, C, H, W), or (N, 1, H, W) (gradcam)
    precision: str = "fp32"  # what the forward and backward passes computed in

    def rows(self) -> list[dict]:
        """One dict per target: its image's path and index, the neuron (layer, channel, y, x) or the
        class (layer None; its name where the model has names) and its activation or logit."""
        return [{"path": self.paths[t.image], "image": t.image, "layer": t.layer, "channel": t.channel,
                 "y": t.y, "x": t.x, "value": t.value,
                 "class": class_label(self.loaded.classes, t.channel) if t.layer is None else None}
                for t in self.targets]

    def save(self, path: str | Path) -> Path:
        """Write the raw maps, images, inputs and targets (``files.raw_maps``, kind saliency)."""
        targets = torch.tensor([[t.image, t.channel, -1 if t.y is None else t.y, -1 if t.x is None else t.x]
                                for t in self.targets])
        meta = {"model": self.loaded.name, "source": self.loaded.source, "layer": self.layer, "paths": self.paths,
                "precision": self.precision, "values": [t.value for t in self.targets],
                "target_layer": self.targets[0].layer,
                "targets": "rows of (image, channel or class, y, x); y = x = -1 for a class logit"}
        return write_raw_maps(path, "saliency", self.maps,
                              {"image": self.images, "input": self.inputs, "targets": targets}, meta)


def explain(
    loaded: LoadedModel,
    paths: Sequence[str | Path],
    layer: str | None = None,
    methods: Sequence[str] = PAPER_METHODS,
    *,
    neuron: tuple[int, int, int] | None = None,
    channels: Sequence[int] | None = None,
    top_channels: int | None = None,
    target_class: int | str | None = None,
    precision: str = "fp32",
) -> Explanation:
    """Read ``paths``, choose the targets (see ``select_targets``; ``target_class`` may also be
    a class name) and compute every method's maps. ``layer`` is the neuron's layer, or with a
    class, the layer whose maps Grad-CAM weighs; default: the model's last conv layer.
    ``precision`` (fp32, bf16, fp16 or auto, see ``device.resolve_precision``) is the autocast
    of both passes; fp32 by default, since a map is the gradient of one neuron and bf16's 8-bit
    mantissa changes it.
    """
    methods = check_methods(methods)
    needs_class = [m for m in methods if SALIENCY_METHODS[m].needs_class]
    if target_class is None and needs_class:
        raise ValueError(f"{', '.join(needs_class)} explain a class "
                         "score: add --class NAME, INDEX or predicted")
    model = loaded.model
    layer = default_layer(model) if layer is None else layer
    get_layer(model, layer)  # an unknown name fails here, before any image is read
    if target_class is not None:
        target_class = class_index(loaded.classes, target_class)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    images, inputs = loaded.read_images(paths)
    with autocast(device, precision):
        targets = select_targets(model, inputs, layer, neuron=neuron, channels=channels,
                                 top_channels=top_channels, target_class=target_class)
        maps = {m: saliency_maps(model, inputs, targets, m, cam_layer=layer).float().cpu() for m in methods}
    if target_class is not None:
        selection = "each image's predicted class logit" if target_class == "predicted" else \
            f"the logit of {class_label(loaded.classes, target_class)}"
    elif neuron is not None:
        selection = f"neuron (channel, y, x) = {tuple(neuron)} of {layer}"
    elif channels is not None:
        selection = f"channel {', '.join(map(str, channels))} of {layer}, each at its spatial maximum"
    elif top_channels is not None:
        selection = f"the {top_channels} most active channels of {layer}, each at its spatial maximum"
    else:
        selection = f"the most active neuron of {layer} (the paper's Fig. 4)"
    return Explanation(loaded, [str(p) for p in paths], images.cpu(), inputs.cpu(), layer,
                       selection, targets, maps, precision)
