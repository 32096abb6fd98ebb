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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from allconv_cli.device import autocast, resolve_precision
from allconv_cli.explain.methods import PAPER_METHODS, SALIENCY_METHODS, check_methods, check_settings
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

__all__ = ["Explanation", "black_input", "explain", "saliency_maps"]


_ROWS_PER_PASS = 64  # rows per forward/backward pass: bounds memory on long scans


def saliency_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[Target],
    method: str = "guided",
    cam_layer: str | None = None,
    *,
    settings: dict | None = None,
    generator: torch.Generator | None = None,
    black: torch.Tensor | None = None,
) -> torch.Tensor:
    """One map per target, computed on ``inputs[target.image]`` (model inputs, (B, C, H, W)) by
    the entry ``method`` of ``SALIENCY_METHODS``: (N, C, H, W), or (N, 1, H, W) for Grad-CAM. A
    method that weighs a layer's maps weighs ``cam_layer``'s (default: the last conv layer); one
    that explains a class needs class targets. ``settings``: the method's own, by name (the rest
    take their defaults); a method that draws noise draws it from ``generator`` (default: one
    seeded with its ``seed`` setting, so that each call draws the same). ``black``: a black image
    as the model's input (``black_input``), for the methods that need one. The model is left as
    it was: no hooks, same parameters and gradients, same train/eval mode.
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
    keywords = _keywords(name, settings, generator, black, inputs.device)
    compute = method.function()
    chunks = []
    for start in range(0, len(targets), _ROWS_PER_PASS):
        rows = targets[start:start + _ROWS_PER_PASS]
        x = inputs[[t.image for t in rows]]
        maps = compute(model, x, rows, layer, **keywords)
        if maps.dim() != 4 or len(maps) != len(x) or maps.shape[1] not in (1, x.shape[1]) \
                or maps.shape[2:] != x.shape[2:]:
            raise ValueError(f"method {name} returned maps of shape {tuple(maps.shape)} for inputs "
                             f"{tuple(x.shape)}: one (C or 1, H, W) map per input")
        chunks.append(maps)
    return torch.cat(chunks)


def _keywords(name: str, settings: dict | None, generator, black, device: torch.device) -> dict:
    """What the entry ``name``'s function gets beyond (model, x, rows, layer): its settings, the
    generator in place of its seed, and black where it needs it."""
    method = SALIENCY_METHODS[name]
    keywords = method.resolve(name, settings)
    if "seed" in keywords:
        seed = keywords.pop("seed")
        keywords["generator"] = generator or torch.Generator(device).manual_seed(seed)
    if method.needs_black:
        if black is None:
            raise ValueError(f"{name} needs black, a black image as the model's input: saliency.black_input gives it")
        keywords["black"] = black.to(device)
    return keywords


def black_input(loaded: LoadedModel) -> torch.Tensor:
    """A black image as ``loaded``'s model sees it, after its preprocessing: (1, C, H, W)."""
    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        return loaded.preprocess(torch.zeros(1, *loaded.input_size, device=device))


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
    settings: dict[str, dict] = field(default_factory=dict)  # method -> its settings as used
    reports: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # method -> what -> (N,)

    def rows(self) -> list[dict]:
        """One dict per target: its image's path and index, the neuron (layer, channel, y, x) or the
        class (layer None; its name where the model has names), its activation or logit, and what
        the methods that measure their maps measured (``reports``: method -> what -> value)."""
        return [{"path": self.paths[t.image], "image": t.image, "layer": t.layer, "channel": t.channel,
                 "y": t.y, "x": t.x, "value": t.value,
                 "class": class_label(self.loaded.classes, t.channel) if t.layer is None else None,
                 "reports": {m: {what: v[i].item() for what, v in measured.items()}
                             for m, measured in self.reports.items()}}
                for i, t in enumerate(self.targets)]

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
    settings: dict[str, dict] | None = None,
) -> Explanation:
    """Read ``paths``, choose the targets (see ``select_targets``; ``target_class`` may also be
    a class name) and compute every method's maps, with its ``settings`` (method -> setting ->
    value; the rest by default). ``layer`` is the neuron's layer, or with a
    class, the layer whose maps Grad-CAM weighs; default: the model's last conv layer.
    ``precision`` (fp32, bf16, fp16 or auto, see ``device.resolve_precision``) is the autocast
    of both passes; fp32 by default, since a map is the gradient of one neuron and bf16's 8-bit
    mantissa changes it.
    """
    methods = check_methods(methods)
    settings = check_settings(methods, settings)
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
        options = {"cam_layer": layer, "black": black_input(loaded)}
        maps = {m: saliency_maps(model, inputs, targets, m, settings=settings[m], **options).float() for m in methods}
        reports = _reports(model, inputs, targets, maps, settings, options)
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
    return Explanation(loaded, [str(p) for p in paths], images.cpu(), inputs.cpu(), layer, selection, targets,
                       {m: v.cpu() for m, v in maps.items()}, precision, settings, reports)


def _reports(model, inputs, targets, maps, settings, options) -> dict[str, dict[str, torch.Tensor]]:
    """What the methods that measure their own maps measured (``Method.report``): method -> what -> (N,)."""
    reports = {}
    for name, computed in maps.items():
        report = SALIENCY_METHODS[name].reporter()
        if report is not None:
            keywords = _keywords(name, settings[name], None, options["black"], inputs.device)
            x = inputs[[t.image for t in targets]]
            reports[name] = {what: v.cpu() for what, v in report(model, x, targets, computed.to(x.device),
                                                                 options["cam_layer"], **keywords).items()}
    return reports
