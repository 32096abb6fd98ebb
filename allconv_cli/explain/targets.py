"""Where the backward signal starts: a model's layers, the forward pass up to one of them, and
the choice of neurons or class logits (``Target`` rows) that saliency maps explain.

Layers are named as users type them: conv1..convN for allconv nets, module paths (``layer4``,
``layer4.1.conv2``) for others. A neuron's value is the layer's output after its ReLU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from allconv_cli.models.net import AllConvNet
from allconv_cli.util import did_you_mean

__all__ = ["Target", "check_range", "class_index", "class_label", "default_layer", "eval_mode",
           "get_layer", "run_to", "select_targets"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode (dropout off, BatchNorm running stats) inside; each module's own mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; an unknown name raises with the model's layer names."""
    if isinstance(model, AllConvNet):
        return model.get_layer(name)  # conv1..convN, with a did-you-mean hint
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    top = [child for child, _ in model.named_children()]
    raise ValueError(f"unknown layer {name!r}{did_you_mean(name, list(modules)[1:])}; "
                     f"{type(model).__name__}'s top-level modules are {', '.join(top)} "
                     "(nested ones with dots, e.g. layer4.1.conv2)")


def default_layer(model: nn.Module) -> str:
    """The last conv layer of an allconv net (conv9 of All-CNN-C), or a timm net's last stage."""
    if isinstance(model, AllConvNet):
        return model.layer_names[-1]
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        return feature_info[-1]["module"]
    top = [child for child, _ in model.named_children()]
    raise ValueError(f"{type(model).__name__} has no default layer: give --layer, e.g. one of "
                     f"{', '.join(top)}")


class _StopForward(Exception):
    """Raised by the capture hook to skip the layers above the one a neuron lives in."""


def run_to(model: nn.Module, x: torch.Tensor, layer: str | None, through: bool = True):
    """Forward ``x`` -> (output of ``layer`` or None, logits or None if stopped at ``layer``)."""
    if layer is None:
        return None, model(x)
    captured = []

    def hook(module, args, output):
        if not (isinstance(output, torch.Tensor) and output.dim() == 4):
            kind = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer {layer!r} outputs {kind}, not a (B, C, H, W) feature map; "
                             "choose a conv layer or block")
        if captured:
            raise ValueError(f"layer {layer!r} runs more than once per forward pass; choose another")
        captured.append(output)
        if not through:
            raise _StopForward
        # A later in-place op (e.g. an inplace ReLU right after a BatchNorm layer) would
        # overwrite the captured map; the layers above get a copy instead.
        return output.clone()

    handle = get_layer(model, layer).register_forward_hook(hook)
    try:
        logits = model(x)
    except _StopForward:
        logits = None
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer!r} is not used in the forward pass; choose another")
    return captured[0], logits


@dataclass(frozen=True)
class Target:
    """Where the backward signal starts for one row: gradient 1 there, 0 everywhere else.

    A neuron (``channel``, ``y``, ``x``) of ``layer``'s post-ReLU output, or, with
    ``layer=None``, the logit of class ``channel`` (``y`` and ``x`` are then None).
    """

    image: int  # index into the batch of inputs
    layer: str | None
    channel: int
    y: int | None
    x: int | None
    value: float  # the neuron's activation (or the logit) in the forward pass


def class_index(classes: list[str] | None, spec: str | int) -> int | str:
    """A class name or index (as text or int), or ``predicted`` -> index or ``predicted``."""
    if spec == "predicted":
        return spec
    if isinstance(spec, int) or str(spec).strip().isdigit():
        return int(spec)
    if classes is None:
        raise ValueError(f"class {spec!r}: this checkpoint has no class names; give an index")
    if spec not in classes:
        raise ValueError(f"unknown class {spec!r}{did_you_mean(spec, classes)}; this checkpoint's classes "
                         f"are {', '.join(classes)} (or give an index, or 'predicted')")
    return classes.index(spec)


def select_targets(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str | None = None,
    *,
    neuron: tuple[int, int, int] | None = None,
    channels: Sequence[int] | None = None,
    top_channels: int | None = None,
    target_class: int | str | None = None,
) -> list[Target]:
    """Choose where the signal starts, for each of ``inputs`` (B, C, H, W) (model inputs).

    Give at most one of: ``neuron`` (channel, y, x) of ``layer``; ``channels``, each at its
    spatial maximum (one row each); ``top_channels`` k, the image's k most active channels,
    each at its spatial maximum (one row each, strongest first); ``target_class``, a class
    index or ``"predicted"`` (each image's top class), for which the signal starts at the
    logit. Default: the neuron of ``layer`` (default: its last conv layer) with the largest
    activation, as in the paper's Fig. 4. Rows are ordered image by image.
    """
    given = [name for name, value in (("--neuron", neuron), ("--channel", channels),
                                      ("--top-channels", top_channels), ("--class", target_class))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} choose the neuron in different ways; give one of them")
    with torch.no_grad(), eval_mode(model):
        if target_class is not None:
            _, logits = run_to(model, inputs, None)
            if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
                raise ValueError(f"{type(model).__name__} does not return (B, classes) logits, so "
                                 "--class cannot start at one; choose a neuron of a --layer instead")
            if target_class == "predicted":
                chosen = logits.argmax(1).tolist()
            else:
                check_range("class", target_class, logits.shape[1])
                chosen = [target_class] * len(inputs)
            return [Target(i, None, c, None, None, logits[i, c].item()) for i, c in enumerate(chosen)]
        layer = default_layer(model) if layer is None else layer
        act, _ = run_to(model, inputs, layer, through=False)  # (B, C, h, w), post-ReLU
    batch, width, height_out, width_out = act.shape
    if neuron is not None:
        c, y, x = neuron
        for what, value, size in (("channel", c, width), ("y", y, height_out), ("x", x, width_out)):
            check_range(f"neuron {what}", value, size)
        return [Target(i, layer, c, y, x, act[i, c, y, x].item()) for i in range(batch)]
    if channels is not None:
        for c in channels:
            check_range("channel", c, width)
        rows = [(i, c) for i in range(batch) for c in channels]
    else:
        k = 1 if top_channels is None else top_channels
        if not 1 <= k <= width:
            raise ValueError(f"--top-channels {k}: {layer} has {width} channels; give 1 to {width}")
        order = act.amax((2, 3)).topk(k, dim=1).indices  # (B, k): channels by their spatial max
        rows = [(i, c) for i in range(batch) for c in order[i].tolist()]
    targets = []
    for i, c in rows:
        y, x = divmod(act[i, c].argmax().item(), width_out)
        targets.append(Target(i, layer, c, y, x, act[i, c, y, x].item()))
    return targets


def check_range(what: str, value: int, size: int):
    if not 0 <= value < size:
        raise ValueError(f"{what} {value} is out of range: this layer has 0 to {size - 1}")


def class_label(classes: list[str] | None, index: int) -> str:
    """``cat (3)`` with class names, ``class 3`` without."""
    return f"{classes[index]} ({index})" if classes and 0 <= index < len(classes) else f"class {index}"
