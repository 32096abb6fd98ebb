"""What a neuron responds to: the paper's three backward rules, Grad-CAM, and top-patch scans.

Section 3.4 of the paper: with f the input of a ReLU in the forward pass and R the signal
coming down from above, the methods differ only at each ReLU:

- ``backprop`` (the plain gradient): R_below = (f > 0) * R
- ``deconvnet``:                     R_below = (R > 0) * R
- ``guided`` (guided backprop):      R_below = (f > 0) * (R > 0) * R

Everything else (convolutions, pooling, averaging) is backpropagated normally. The rules are
applied at every ReLU of the model however it is called (``nn.ReLU``, ``nn.ReLU(inplace=True)``,
``F.relu``, ``torch.relu(_)``, ``x.relu(_)``, ``F.threshold(x, 0, 0)``) by a
``TorchFunctionMode`` that is active only during the forward pass of a saliency call: the
model itself is never modified. The autograd graph is then checked: a ReLU that escaped the
mode (called through ``torch.ops``) or another activation (GELU, SiLU, sigmoid, tanh, ...),
which the paper's rules do not cover, makes ``deconvnet`` and ``guided`` refuse the model;
``backprop`` and Grad-CAM, plain gradients, work on any model.

Maps are gradients with respect to the model's input, i.e. after preprocessing, with the
shape of that input (B, C, H, W). Beyond the paper: ``gradcam`` (Selvaraju et al., 2017) and
``guided-gradcam`` (guided backprop times Grad-CAM), both for a class score.

Typical use::

    from allconv_cli.saliency import load_for_saliency, explain

    loaded = load_for_saliency()        # the bundled All-CNN-C trained on CIFAR-10
    result = explain(loaded, ["cat.jpg"], layer="conv6", methods=["guided"])
    result.maps["guided"]               # (1, 3, 32, 32): the max neuron of conv6
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from allconv_cli import preprocess as preprocessing
from allconv_cli.checkpoint import atomic_write, load_model, load_state, resolve_weights
from allconv_cli.images import open_image
from allconv_cli.models import LAYERS, AllConvNet, ConvBlock, did_you_mean, create_model, resolve_name

__all__ = [
    "BUNDLED_CHECKPOINT",
    "METHODS",
    "PAPER_METHODS",
    "Explanation",
    "LoadedModel",
    "ReceptiveField",
    "Target",
    "TopPatches",
    "class_label",
    "default_layer",
    "explain",
    "load_for_saliency",
    "load_images",
    "receptive_field",
    "saliency_maps",
    "select_targets",
    "top_patches",
]

PAPER_METHODS = ("backprop", "deconvnet", "guided")
METHODS = (*PAPER_METHODS, "gradcam", "guided-gradcam")
CLASS_METHODS = ("gradcam", "guided-gradcam")  # explain a class score, so need a class target

# An All-CNN-C trained on CIFAR-10, shipped inside the wheel.
BUNDLED_CHECKPOINT = Path(__file__).parent / "assets" / "all-cnn-c-cifar10.safetensors"

_ROWS_PER_PASS = 64  # rows per forward/backward pass: bounds memory on long scans


# --------------------------------------------------------------------------- the rules


class _ReLURule(torch.autograd.Function):
    """ReLU forward; backward by one of the paper's rules instead of the plain gradient."""

    @staticmethod
    def forward(ctx, f, rule, inplace):
        ctx.rule = rule
        ctx.save_for_backward(f > 0)  # bool mask, before an in-place ReLU overwrites f
        if inplace:
            ctx.mark_dirty(f)
            return f.relu_()
        return f.relu()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, r):
        (f_positive,) = ctx.saved_tensors
        if ctx.rule == "backprop":
            keep = f_positive
        elif ctx.rule == "deconvnet":
            keep = r > 0
        else:  # guided
            keep = f_positive & (r > 0)
        return torch.where(keep, r, 0), None, None


_RELU = {torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_}


def _as_relu(func, args, kwargs) -> tuple[torch.Tensor, bool] | None:
    """(input, inplace) if this call is a ReLU, else None."""
    if func in _RELU or func in _RELU_INPLACE:
        return args[0], func in _RELU_INPLACE
    if func is F.relu:  # F.relu(input, inplace=False); nn.ReLU calls this
        return args[0], bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
    if func in (F.threshold, torch.threshold, torch.threshold_):  # (input, threshold, value[, inplace])
        params = list(args[1:]) + [kwargs[k] for k in ("threshold", "value", "inplace") if k in kwargs]
        if len(params) >= 2 and params[0] == 0 and params[1] == 0:
            inplace = func is torch.threshold_ or (len(params) > 2 and bool(params[2]))
            return args[0], inplace
    return None


class _ReLURules(TorchFunctionMode):
    """While active, every ReLU call runs as ``_ReLURule`` with ``rule``; all else unchanged."""

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        relu = _as_relu(func, args, kwargs)
        if relu is not None:
            return _ReLURule.apply(relu[0], self.rule, relu[1])
        return func(*args, **kwargs)


# Autograd nodes of ReLUs that bypassed the mode (e.g. called through torch.ops), and of
# activations the paper's rules do not cover.
_ESCAPED_RELU = re.compile(r"^(Relu|Threshold)Backward\d+$")
_OTHER_ACTIVATION = re.compile(
    r"^(Gelu|Silu|Elu|Selu|Celu|LeakyRelu|RreluWithNoise|PreluKernel|Hardtanh|Hardswish|"
    r"Hardsigmoid|Sigmoid|LogSigmoid|Tanh|Softplus|Mish|Glu)Backward\d+$"
)


def _check_graph(root: torch.Tensor, method: str, model: nn.Module):
    """Refuse a graph where ``method``'s rule would not be applied at every nonlinearity."""
    seen, stack = set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if _ESCAPED_RELU.match(name):
            raise ValueError(f"{type(model).__name__} applies a ReLU that the {method} rule cannot "
                             f"reach ({name}: called through torch.ops or C++); use --methods backprop")
        if _OTHER_ACTIVATION.match(name):
            act = _OTHER_ACTIVATION.match(name).group(1)
            raise ValueError(f"{type(model).__name__} uses {act}, not a ReLU: the paper's deconvnet and "
                             "guided rules are defined at ReLUs only; use --methods backprop,gradcam "
                             "for this model")
        stack.extend(next_node for next_node, _ in node.next_functions)


# --------------------------------------------------------------------------- the model


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (dropout off, BatchNorm running stats) inside; each module's own mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _layer(model: nn.Module, name: str) -> nn.Module:
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


def _run(model: nn.Module, x: torch.Tensor, layer: str | None, through: bool = True):
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

    handle = _layer(model, layer).register_forward_hook(hook)
    try:
        logits = model(x)
    except _StopForward:
        logits = None
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer!r} is not used in the forward pass; choose another")
    return captured[0], logits


@dataclass
class LoadedModel:
    """A model ready for saliency: eval mode, with its preprocessing and input size."""

    model: nn.Module
    preprocess: nn.Module  # float [0, 1] images (B, C, H, W) -> the model's input
    input_size: tuple[int, int, int]  # (C, H, W)
    classes: list[str] | None  # class names by index, when the checkpoint has them
    name: str  # e.g. all-cnn-c, resnet18
    source: str  # where the weights came from


def load_for_saliency(
    checkpoint: str | Path | None = None,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load an allconv checkpoint (a run folder or .safetensors), or by default the bundled
    All-CNN-C; with ``model_name`` (a timm or torchvision name, e.g. resnet18), build that net
    and load ``checkpoint`` as its plain safetensors state dict, preprocessed with the net's
    own mean, std and input size.
    """
    if model_name is not None:
        if checkpoint is None:
            raise ValueError(f"--model {model_name} needs --checkpoint WEIGHTS.safetensors "
                             "(a plain safetensors state dict for it)")
        return _load_foreign(model_name, checkpoint, device)
    if checkpoint is None:
        if not BUNDLED_CHECKPOINT.is_file():
            raise FileNotFoundError(f"the bundled All-CNN-C weights are missing from this install "
                                    f"({BUNDLED_CHECKPOINT}): give --checkpoint RUN_FOLDER_OR_FILE")
        checkpoint, source = BUNDLED_CHECKPOINT, f"bundled {BUNDLED_CHECKPOINT.name}"
    else:
        source = str(checkpoint)
    model, meta, tensors = load_model(checkpoint, device)
    missing = [key for key in ("preprocess", "input_size") if key not in meta]
    if missing:
        raise ValueError(f"{checkpoint} has no {' or '.join(missing)} in its metadata; "
                         "save it again with allconv's current checkpoint format")
    return LoadedModel(
        model=model,
        preprocess=preprocessing.from_meta(meta["preprocess"], tensors).to(device),
        input_size=tuple(meta["input_size"]),
        classes=meta.get("classes"),
        name=meta["model"].replace("_", "-"),
        source=source,
    )


def _load_foreign(name: str, checkpoint: str | Path, device) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_weights(checkpoint)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if name.strip().lower().replace("-", "_") in LAYERS:
        model = create_model(resolve_name(name))
    else:
        model = _build_by_name(name)
    if hasattr(model, "pretrained_cfg"):  # timm nets, ours included
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        mean, std, input_size = config["mean"], config["std"], tuple(config["input_size"])
    else:  # torchvision: the size and statistics its own pretrained weights expect
        from torchvision.models import get_model_weights

        transform = get_model_weights(name).DEFAULT.transforms()
        mean, std = transform.mean, transform.std
        input_size = (3, transform.crop_size[0], transform.crop_size[0])
    load_state(model, state, f"{path} does not fit {name}")
    return LoadedModel(model=model.to(device).eval(),
                       preprocess=preprocessing.Standardize(mean, std).to(device),
                       input_size=input_size, classes=None, name=name, source=str(path))


def _build_by_name(name: str) -> nn.Module:
    """A timm net by name, else a torchvision one; both with random weights."""
    import timm
    import torchvision

    if timm.is_model(name):
        return timm.create_model(name)
    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None)
    known = timm.list_models() + torchvision.models.list_models()
    raise ValueError(f"unknown model {name!r}{did_you_mean(name, known)}: neither timm nor torchvision "
                     "has it (allconv's own nets need no --model: their checkpoints name them)")


def load_images(paths: Sequence[str | Path], input_size: Sequence[int]) -> torch.Tensor:
    """Image files -> float [0, 1] tensor (B, C, H, W) at ``input_size`` (C, H, W).

    Each image is scaled (bicubic, antialiased) to cover H x W, then center-cropped: the
    shorter side fits, the longer side loses equal margins.
    """
    import numpy as np
    from PIL import Image, ImageOps

    channels, height, width = input_size
    batch = []
    for path in paths:
        img = ImageOps.fit(open_image(path, channels), (width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(img, dtype=np.float32) / 255)
        batch.append(pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels[None])
    return torch.stack(batch)


# --------------------------------------------------------------------------- neurons


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


def _class_index(classes: list[str] | None, spec: str | int) -> int | str:
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
    with torch.no_grad(), _eval_mode(model):
        if target_class is not None:
            _, logits = _run(model, inputs, None)
            if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
                raise ValueError(f"{type(model).__name__} does not return (B, classes) logits, so "
                                 "--class cannot start at one; choose a neuron of a --layer instead")
            if target_class == "predicted":
                chosen = logits.argmax(1).tolist()
            else:
                _check_range("class", target_class, logits.shape[1])
                chosen = [target_class] * len(inputs)
            return [Target(i, None, c, None, None, logits[i, c].item()) for i, c in enumerate(chosen)]
        layer = default_layer(model) if layer is None else layer
        act, _ = _run(model, inputs, layer, through=False)  # (B, C, h, w), post-ReLU
    batch, width, height_out, width_out = act.shape
    if neuron is not None:
        c, y, x = neuron
        for what, value, size in (("channel", c, width), ("y", y, height_out), ("x", x, width_out)):
            _check_range(f"neuron {what}", value, size)
        return [Target(i, layer, c, y, x, act[i, c, y, x].item()) for i in range(batch)]
    if channels is not None:
        for c in channels:
            _check_range("channel", c, width)
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


def _check_range(what: str, value: int, size: int):
    if not 0 <= value < size:
        raise ValueError(f"{what} {value} is out of range: this layer has 0 to {size - 1}")


# --------------------------------------------------------------------------- maps


def saliency_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[Target],
    method: str = "guided",
    cam_layer: str | None = None,
) -> torch.Tensor:
    """One map per target, computed on ``inputs[target.image]`` (model inputs, (B, C, H, W)).

    ``backprop``, ``deconvnet`` and ``guided`` return (N, C, H, W): the signal brought down
    to the input by the method's rule. ``gradcam`` returns (N, 1, H, W): the ReLU of the
    ``cam_layer`` maps weighted by their spatially averaged gradient, bilinearly upsampled;
    ``guided-gradcam`` returns guided times gradcam. Both need class targets. The model is
    left as it was: no hooks, same parameters and gradients, same train/eval mode.
    """
    method = _check_methods([method])[0]
    if not targets:
        raise ValueError("no targets: select_targets chooses them")
    layers = {t.layer for t in targets}
    if len(layers) > 1:
        raise ValueError(f"targets mix layers {sorted(map(str, layers))}; compute them separately")
    if method in CLASS_METHODS:
        if targets[0].layer is not None:
            raise ValueError(f"{method} explains a class score: select the targets with --class "
                             "NAME, INDEX or predicted")
        if cam_layer is None:
            cam_layer = default_layer(model)
    chunks = []
    for start in range(0, len(targets), _ROWS_PER_PASS):
        rows = targets[start:start + _ROWS_PER_PASS]
        x = inputs[[t.image for t in rows]]
        if method == "gradcam":
            chunks.append(_gradcam(model, x, rows, cam_layer))
        elif method == "guided-gradcam":
            chunks.append(_rule_map(model, x, rows, "guided") * _gradcam(model, x, rows, cam_layer))
        else:
            chunks.append(_rule_map(model, x, rows, method))
    return torch.cat(chunks)


def _check_methods(methods: Iterable[str]) -> tuple[str, ...]:
    """Validate method names (see METHODS); duplicates are dropped, order kept."""
    methods = tuple(dict.fromkeys(m.strip() for m in methods if m.strip()))
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}{did_you_mean(method, METHODS)}; "
                             f"choose from {', '.join(METHODS)}")
    if not methods:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}")
    return methods


def _seed(root: torch.Tensor, rows: Sequence[Target]) -> torch.Tensor:
    """The starting signal: 1 at each row's neuron (or logit), 0 elsewhere; shaped like root."""
    seed = torch.zeros_like(root)
    for i, t in enumerate(rows):
        if t.layer is None:
            seed[i, t.channel] = 1
        else:
            seed[i, t.channel, t.y, t.x] = 1
    return seed


def _rule_map(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], rule: str) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), _eval_mode(model):
        with _ReLURules(rule):
            act, logits = _run(model, x, rows[0].layer, through=False)
        root = logits if act is None else act
        if rule != "backprop":  # the plain gradient is right whatever the nonlinearity
            _check_graph(root, rule, model)
        (grad,) = torch.autograd.grad(root, x, _seed(root, rows))
    return grad


def _gradcam(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str) -> torch.Tensor:
    with torch.enable_grad(), _eval_mode(model):
        act, logits = _run(model, x.detach(), layer)  # act (N, K, h, w)
        (grad,) = torch.autograd.grad(logits, act, _seed(logits, rows))
    weights = grad.mean((2, 3), keepdim=True)  # (N, K, 1, 1): each map's importance for the class
    cam = (weights * act.detach()).sum(1, keepdim=True).relu()  # (N, 1, h, w)
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- images


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
    maps: dict[str, torch.Tensor]  # method -> (N, C, H, W); (N, 1, H, W) for gradcam

    def save(self, path: str | Path) -> Path:
        """Write the raw maps, images, inputs and targets as safetensors (atomically)."""
        from safetensors.torch import save_file

        tensors = {"image": self.images, "input": self.inputs,
                   "targets": torch.tensor([[t.image, t.channel, -1 if t.y is None else t.y,
                                             -1 if t.x is None else t.x] for t in self.targets])}
        tensors.update({f"maps.{method}": m for method, m in self.maps.items()})
        meta = {"model": self.loaded.name, "source": self.loaded.source, "layer": self.layer,
                "paths": self.paths, "methods": list(self.maps),
                "targets": "rows of (image, channel or class, y, x); y = x = -1 for a class logit",
                "values": [t.value for t in self.targets],
                "target_layer": self.targets[0].layer}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), {"allconv": json.dumps(meta)}))


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
) -> Explanation:
    """Read ``paths``, choose the targets (see ``select_targets``; ``target_class`` may also be
    a class name) and compute every method's maps. ``layer`` is the neuron's layer, or with a
    class, the layer whose maps Grad-CAM weighs; default: the model's last conv layer.
    """
    methods = _check_methods(methods)
    if target_class is None and any(m in CLASS_METHODS for m in methods):
        raise ValueError(f"{', '.join(m for m in methods if m in CLASS_METHODS)} explain a class "
                         "score: add --class NAME, INDEX or predicted")
    model = loaded.model
    layer = default_layer(model) if layer is None else layer
    _layer(model, layer)  # an unknown name fails here, before any image is read
    if target_class is not None:
        target_class = _class_index(loaded.classes, target_class)
    device = next(model.parameters()).device
    images = load_images(paths, loaded.input_size).to(device)
    with torch.no_grad():
        inputs = loaded.preprocess(images)
    targets = select_targets(model, inputs, layer, neuron=neuron, channels=channels,
                             top_channels=top_channels, target_class=target_class)
    maps = {m: saliency_maps(model, inputs, targets, m, cam_layer=layer).cpu() for m in methods}
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
                       selection, targets, maps)


def class_label(classes: list[str] | None, index: int) -> str:
    """``cat (3)`` with class names, ``class 3`` without."""
    return f"{classes[index]} ({index})" if classes and 0 <= index < len(classes) else f"class {index}"


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class ReceptiveField:
    """The input window one neuron of a layer sees, per axis (rows, cols), in input pixels."""

    size: tuple[int, int]  # window height and width
    stride: tuple[int, int]  # input pixels between neighbouring neurons
    offset: tuple[int, int]  # first row and column seen by neuron (0, 0); negative inside padding

    def window(self, y: int, x: int) -> tuple[int, int]:
        """(top, left) of neuron (y, x)'s window; it may reach outside the image."""
        return self.offset[0] + y * self.stride[0], self.offset[1] + x * self.stride[1]


def receptive_field(model: nn.Module, layer: str) -> ReceptiveField:
    """The receptive field of ``layer``'s neurons, from the kernels, strides and paddings of
    the convs and pools below it (dilation included). allconv nets only: they are chains.

    All-CNN-C: conv6 sees 19x19 pixels at a stride of 4, conv7 to conv9 27x27.
    """
    if not isinstance(model, AllConvNet):
        raise ValueError(f"receptive fields are computed for allconv's own networks (chains of "
                         f"convs and pools), not {type(model).__name__}")
    model.get_layer(layer)
    size, stride, offset = [1, 1], [1, 1], [0, 0]
    for name, module in model.features.named_children():
        op = module.conv if isinstance(module, ConvBlock) else module
        if isinstance(op, (nn.Conv2d, nn.MaxPool2d)):
            kernel, step, pad, dilation = (_pair(getattr(op, a)) for a in
                                           ("kernel_size", "stride", "padding", "dilation"))
            for axis in (0, 1):
                offset[axis] -= pad[axis] * stride[axis]
                size[axis] += dilation[axis] * (kernel[axis] - 1) * stride[axis]
                stride[axis] *= step[axis]
        if name == layer:
            break
    return ReceptiveField(tuple(size), tuple(stride), tuple(offset))


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@dataclass
class TopPatches:
    """Per filter, the data set's most activating patches and their reconstructions."""

    layer: str
    channels: list[int]
    field: ReceptiveField  # of the layer's neurons; the crops' size
    scanned: int  # images seen
    values: torch.Tensor  # (S, k) the filter's activation, strongest first
    indices: torch.Tensor  # (S, k) position of the image in the scanned stream
    labels: torch.Tensor  # (S, k) its label
    positions: torch.Tensor  # (S, k, 2) the neuron (y, x) in the layer's map
    patches: torch.Tensor  # (S, k, C, h, w) in [0, 1], cropped to the receptive field; grey outside the image
    maps: dict[str, torch.Tensor]  # method -> (S, k, C, h, w), same crops; 0 outside the image

    def save(self, path: str | Path) -> Path:
        """Write every tensor as safetensors (atomically)."""
        from safetensors.torch import save_file

        tensors = {"values": self.values, "indices": self.indices, "labels": self.labels,
                   "positions": self.positions, "patches": self.patches,
                   "channels": torch.tensor(self.channels),
                   **{f"maps.{m}": v for m, v in self.maps.items()}}
        meta = {"layer": self.layer, "scanned": self.scanned, "receptive_field": {
            "size": self.field.size, "stride": self.field.stride, "offset": self.field.offset}}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), {"allconv": json.dumps(meta)}))


def top_patches(
    model: nn.Module,
    preprocess: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layer: str,
    channels: Sequence[int] | None = None,
    top: int = 10,
    methods: Sequence[str] = ("guided",),
) -> TopPatches:
    """The paper's Fig. 3: scan ``batches`` of (uint8 images (B, C, H, W), labels (B,)) for
    the ``top`` images whose best neuron of each filter in ``channels`` (default: the layer's
    first 8) fires most, then reconstruct that neuron on its image with each method, both
    cropped to its receptive field. Memory: the top images only, not the data set.
    """
    methods = _check_methods(methods)
    if top < 1:
        raise ValueError(f"--top {top}: give at least 1 patch per filter")
    bad = [m for m in methods if m in CLASS_METHODS]
    if bad:
        raise ValueError(f"{', '.join(bad)} explain class scores, not filters; "
                         "use backprop, deconvnet or guided")
    rf = receptive_field(model, layer)
    device = next(model.parameters()).device
    best = None  # (values, stream indices, flat positions), each (k, S): running top-k per filter
    kept: dict[int, tuple[torch.Tensor, int]] = {}  # stream index -> (uint8 image, label)
    seen = 0
    for images, labels in batches:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"scan batches must be uint8 (B, C, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        with torch.no_grad(), _eval_mode(model):
            act, _ = _run(model, preprocess(images.to(device).float() / 255), layer, through=False)
        if best is None:  # act: (B, C, h, w)
            channels = list(range(min(8, act.shape[1]))) if channels is None else list(channels)
            for c in channels:
                _check_range("channel", c, act.shape[1])
        values, where = act[:, channels].flatten(2).max(2)  # (B, S): each image's best neuron per filter
        ids = torch.arange(seen, seen + len(images), device=device)[:, None].expand_as(values)
        candidates = (values, ids, where) if best is None else \
            tuple(torch.cat(pair) for pair in zip(best, (values, ids, where)))
        order = candidates[0].topk(min(top, len(candidates[0])), dim=0).indices  # (k, S)
        best = tuple(t.gather(0, order) for t in candidates)
        needed = set(best[1].flatten().tolist())
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            if seen + i in needed:
                kept[seen + i] = (image.clone(), label)  # a clone frees the rest of the batch
        kept = {i: v for i, v in kept.items() if i in needed}
        seen += len(images)
    if best is None:
        raise ValueError("the data set yielded no images to scan")
    values, ids, where = (t.T.cpu() for t in best)  # (S, k)
    ys, xs = where // act.shape[3], where % act.shape[3]
    n_filters, k = values.shape
    images01 = torch.stack([kept[i][0] for i in ids.flatten().tolist()]).float() / 255  # (S*k, C, H, W)
    with torch.no_grad():
        inputs = preprocess(images01.to(device))
    targets = [Target(row, layer, channels[row // k], ys.flatten()[row].item(), xs.flatten()[row].item(),
                      values.flatten()[row].item()) for row in range(n_filters * k)]
    windows = [rf.window(t.y, t.x) for t in targets]
    return TopPatches(
        layer=layer, channels=channels, field=rf, scanned=seen, values=values, indices=ids,
        labels=torch.tensor([kept[i][1] for i in ids.flatten().tolist()]).view(n_filters, k),
        positions=torch.stack([ys, xs], -1),
        patches=_crop(images01, windows, rf.size, 0.5).unflatten(0, (n_filters, k)),
        maps={m: _crop(saliency_maps(model, inputs, targets, m).cpu(), windows, rf.size, 0.0)
              .unflatten(0, (n_filters, k)) for m in methods},
    )


def _crop(batch: torch.Tensor, windows, size: tuple[int, int], fill: float) -> torch.Tensor:
    """Crop each of ``batch`` (N, C, H, W) at its (top, left) window of ``size``; ``fill`` outside."""
    pad_y, pad_x = size
    padded = F.pad(batch, (pad_x, pad_x, pad_y, pad_y), value=fill)
    return torch.stack([padded[i, :, top + pad_y:top + pad_y + size[0], left + pad_x:left + pad_x + size[1]]
                        for i, (top, left) in enumerate(windows)])
