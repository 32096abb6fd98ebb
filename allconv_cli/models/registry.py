"""The paper's networks as one timm registry: layer tables, one builder, one function per name.

Every network is built from a row of ``LAYERS``: a list of tokens read left to right.

- ``(kernel, width, stride)`` or ``(kernel, width, stride, padding)``: a conv + ReLU. Padding
  defaults to "same" (``kernel // 2``); the head's 3x3 conv is unpadded ("valid", 8x8 -> 6x6).
  ``width=None`` is the class conv (``num_classes`` outputs).
- ``"M"``: 3x3 max-pool, stride 2, padding 1 (32 -> 16 -> 8), followed by 50 % dropout.
- ``"D"``: 50 % dropout after a conv that replaces a pool (strided and All-CNN models).

Convolutions are named conv1..convN in order, as in the paper, and are addressable by those
names (``model.get_layer("conv6")``). Where this file and the paper's PDF disagree, the PDF wins.

``VARIANTS`` registers deviations that have weights of their own: ``all_cnn_c_bn`` is All-CNN-C
with BatchNorm and its own dropout, and ``timm.create_model("all_cnn_c_bn", pretrained=True)``
loads the bundled CIFAR-10 weights from the package, offline.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
    resolve_pretrained_cfg,
)
from torch import nn

from allconv_cli.models.net import AllConvNet, ConvBlock, feature_layers
from allconv_cli.util import did_you_mean

# CIFAR-10 per-channel statistics of the training split, on [0, 1] pixels.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)


CIFAR10_STD = (0.2470, 0.2435, 0.2616)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


_HEAD = [(3, 192, 1, 0), (1, 192, 1), (1, None, 1)]  # 8x8 -> 6x6, 1x1, 1x1 to classes


LAYERS: dict[str, list] = {
    # Table 1: base models. Table 2: Strided- (stride on the conv before each pool),
    # ConvPool- (extra 3x3 conv before each pool), All-CNN- (pool replaced by 3x3 stride-2 conv).
    "model_a": [(5, 96, 1), "M", (5, 192, 1), "M", *_HEAD],
    "strided_cnn_a": [(5, 96, 2), "D", (5, 192, 2), "D", *_HEAD],
    "convpool_cnn_a": [(5, 96, 1), (3, 96, 1), "M", (5, 192, 1), (3, 192, 1), "M", *_HEAD],
    "all_cnn_a": [(5, 96, 1), (3, 96, 2), "D", (5, 192, 1), (3, 192, 2), "D", *_HEAD],
    "model_b": [(5, 96, 1), (1, 96, 1), "M", (5, 192, 1), (1, 192, 1), "M", *_HEAD],
    "strided_cnn_b": [(5, 96, 1), (1, 96, 2), "D", (5, 192, 1), (1, 192, 2), "D", *_HEAD],
    "convpool_cnn_b": [
        (5, 96, 1), (1, 96, 1), (3, 96, 1), "M",
        (5, 192, 1), (1, 192, 1), (3, 192, 1), "M", *_HEAD,
    ],
    "all_cnn_b": [
        (5, 96, 1), (1, 96, 1), (3, 96, 2), "D",
        (5, 192, 1), (1, 192, 1), (3, 192, 2), "D", *_HEAD,
    ],
    "model_c": [(3, 96, 1), (3, 96, 1), "M", (3, 192, 1), (3, 192, 1), "M", *_HEAD],
    "strided_cnn_c": [(3, 96, 1), (3, 96, 2), "D", (3, 192, 1), (3, 192, 2), "D", *_HEAD],
    "convpool_cnn_c": [
        (3, 96, 1), (3, 96, 1), (3, 96, 1), "M",
        (3, 192, 1), (3, 192, 1), (3, 192, 1), "M", *_HEAD,
    ],
    "all_cnn_c": [
        (3, 96, 1), (3, 96, 1), (3, 96, 2), "D",
        (3, 192, 1), (3, 192, 1), (3, 192, 2), "D", *_HEAD,
    ],
    # Appendix: an upscaled All-CNN-B for 224x224 input. The paper gives no padding; we pad
    # every conv "same", so the maps are 56 -> 28 -> 14 -> 7 and the global average is 7x7.
    "all_cnn_imagenet": [
        (11, 96, 4), (1, 96, 1), (3, 96, 2),
        (5, 256, 1), (1, 256, 1), (3, 256, 2),
        (3, 384, 1), (1, 384, 1), (3, 384, 2), "D",
        (3, 1024, 1), (1, 1024, 1), (1, None, 1),
    ],
}


# What the paper reports: rounded parameter counts and test error in % (Tables 3-5, appendix).
# "cifar10" is without augmentation, "cifar10-aug" with flips and translations.
PAPER: dict[str, dict] = {
    "model_a": {"params": "~0.9 M", "error": {"cifar10": 12.47}},
    "strided_cnn_a": {"params": "~0.9 M", "error": {"cifar10": 13.46}},
    "convpool_cnn_a": {"params": "~1.28 M", "error": {"cifar10": 10.21}},
    "all_cnn_a": {"params": "~1.28 M", "error": {"cifar10": 10.30}},
    "model_b": {"params": "~1 M", "error": {"cifar10": 10.20}},
    "strided_cnn_b": {"params": "~1 M", "error": {"cifar10": 10.98}},
    "convpool_cnn_b": {"params": "~1.35 M", "error": {"cifar10": 9.33}},
    "all_cnn_b": {"params": "~1.35 M", "error": {"cifar10": 9.10}},
    "model_c": {"params": "~1.3 M", "error": {"cifar10": 9.74}},
    "strided_cnn_c": {"params": "~1.3 M", "error": {"cifar10": 10.19}},
    "convpool_cnn_c": {"params": "~1.4 M", "error": {"cifar10": 9.31}},
    "all_cnn_c": {
        "params": "~1.4 M",
        "error": {"cifar10": 9.08, "cifar10-aug": 7.25, "cifar100": 33.71},
    },
    "all_cnn_imagenet": {"params": "< 10 M", "error": {"imagenet": 41.2}},
}


# Deviations registered for weights of their own: name -> (row of LAYERS, model options). On
# the command line the same network is --model all-cnn-c --batch-norm --drop-input 0 --drop-rate 0.25.
VARIANTS: dict[str, tuple[str, dict]] = {
    "all_cnn_c_bn": ("all_cnn_c", {"batch_norm": True, "drop_input": 0.0, "drop_rate": 0.25}),
}


BUNDLED_WEIGHTS = Path(__file__).parents[1] / "assets" / "all-cnn-c-cifar10.safetensors"


# The per-channel standardization the bundled weights were trained with (the training split of
# the CIFAR-10 JPEG copy), as recorded in the file's allconv metadata; a test keeps them equal.
BUNDLED_MEAN = (0.4912503957748413, 0.4820902943611145, 0.44652095437049866)


BUNDLED_STD = (0.24523161351680756, 0.24278154969215393, 0.26062875986099243)


def _cfg(**kwargs):
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (6, 6),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "features.conv1.conv",
        "classifier": "features.conv9.conv",
        "license": "mit",
        "paper_ids": "arXiv:1412.6806",
        "paper_name": "Striving for Simplicity: The All Convolutional Net",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "model_a": _cfg(classifier="features.conv5.conv"),
    "strided_cnn_a": _cfg(classifier="features.conv5.conv"),
    "convpool_cnn_a": _cfg(classifier="features.conv7.conv"),
    "all_cnn_a": _cfg(classifier="features.conv7.conv"),
    "model_b": _cfg(classifier="features.conv7.conv"),
    "strided_cnn_b": _cfg(classifier="features.conv7.conv"),
    "convpool_cnn_b": _cfg(classifier="features.conv9.conv"),
    "all_cnn_b": _cfg(classifier="features.conv9.conv"),
    "model_c": _cfg(classifier="features.conv7.conv"),
    "strided_cnn_c": _cfg(classifier="features.conv7.conv"),
    "convpool_cnn_c": _cfg(),
    "all_cnn_c": _cfg(),
    "all_cnn_imagenet": _cfg(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, classifier="features.conv12.conv",
    ),
    # the first tag of a name is its default: timm.create_model("all_cnn_c_bn", pretrained=True)
    "all_cnn_c_bn.cifar10": _cfg(
        file=str(BUNDLED_WEIGHTS), mean=BUNDLED_MEAN, std=BUNDLED_STD, label_names=CIFAR10_CLASSES,
        notes=("All-CNN-C with BatchNorm (a deviation), trained by allconv on the CIFAR-10 JPEG copy "
               "with flips and translations: 9.97 % top-1 error on its 10,000 test images",),
    ),
})


def pretrained_names() -> list[str]:
    """The registered ``name.tag`` entries that have weights, e.g. ``all_cnn_c_bn.cifar10``."""
    return [f"{name}.{tag}" for name, entry in default_cfgs.items() for tag, cfg in entry.cfgs.items() if cfg.file]


def _create(variant: str, pretrained: bool = False, **kwargs) -> AllConvNet:
    row, options = VARIANTS.get(variant, (variant, {}))
    kwargs = {**options, **kwargs}
    if variant == "all_cnn_imagenet":
        kwargs.setdefault("drop_input", 0.0)  # the appendix net has one dropout, after conv9
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not any(getattr(cfg, key) for key in ("file", "url", "hf_hub_id", "state_dict")):
            raise ValueError(f"{variant} has no pretrained weights; {', '.join(pretrained_names())} has them: "
                             f"timm.create_model({pretrained_names()[0].split('.')[0]!r}, pretrained=True), "
                             "or pass pretrained_cfg_overlay=dict(file=...) for your own")
    features = feature_layers(LAYERS[row])
    return build_model_with_cfg(AllConvNet, variant, pretrained, layers=LAYERS[row],
                                feature_cfg={"flatten_sequential": True, "out_indices": tuple(range(len(features)))},
                                pretrained_filter_fn=_fit_class_block, **kwargs)


def _fit_class_block(state_dict: dict, model: AllConvNet) -> dict:
    """Drop the class conv block's tensors where their shape differs (another number of classes):
    timm drops the class conv's weight and bias itself, but not the BatchNorm after it."""
    prefix, own = f"features.{model.layer_names[-1]}.", model.state_dict()
    return {key: value for key, value in state_dict.items()
            if not (key.startswith(prefix) and key in own and own[key].shape != value.shape)}


@register_model
def model_a(pretrained=False, **kwargs) -> AllConvNet:
    return _create("model_a", pretrained, **kwargs)


@register_model
def strided_cnn_a(pretrained=False, **kwargs) -> AllConvNet:
    return _create("strided_cnn_a", pretrained, **kwargs)


@register_model
def convpool_cnn_a(pretrained=False, **kwargs) -> AllConvNet:
    return _create("convpool_cnn_a", pretrained, **kwargs)


@register_model
def all_cnn_a(pretrained=False, **kwargs) -> AllConvNet:
    return _create("all_cnn_a", pretrained, **kwargs)


@register_model
def model_b(pretrained=False, **kwargs) -> AllConvNet:
    return _create("model_b", pretrained, **kwargs)


@register_model
def strided_cnn_b(pretrained=False, **kwargs) -> AllConvNet:
    return _create("strided_cnn_b", pretrained, **kwargs)


@register_model
def convpool_cnn_b(pretrained=False, **kwargs) -> AllConvNet:
    return _create("convpool_cnn_b", pretrained, **kwargs)


@register_model
def all_cnn_b(pretrained=False, **kwargs) -> AllConvNet:
    return _create("all_cnn_b", pretrained, **kwargs)


@register_model
def model_c(pretrained=False, **kwargs) -> AllConvNet:
    return _create("model_c", pretrained, **kwargs)


@register_model
def strided_cnn_c(pretrained=False, **kwargs) -> AllConvNet:
    return _create("strided_cnn_c", pretrained, **kwargs)


@register_model
def convpool_cnn_c(pretrained=False, **kwargs) -> AllConvNet:
    return _create("convpool_cnn_c", pretrained, **kwargs)


@register_model
def all_cnn_c(pretrained=False, **kwargs) -> AllConvNet:
    return _create("all_cnn_c", pretrained, **kwargs)


@register_model
def all_cnn_imagenet(pretrained=False, **kwargs) -> AllConvNet:
    return _create("all_cnn_imagenet", pretrained, **kwargs)


@register_model
def all_cnn_c_bn(pretrained=False, **kwargs) -> AllConvNet:
    return _create("all_cnn_c_bn", pretrained, **kwargs)


def list_models() -> list[str]:
    """The registered names as users type them on the command line (``all-cnn-c``)."""
    return [name.replace("_", "-") for name in LAYERS]


def resolve_name(name: str) -> str:
    """``all-cnn-c`` or ``all_cnn_c`` -> ``all_cnn_c``; an unknown name raises with a hint."""
    key = name.strip().lower().replace("-", "_")
    if key not in LAYERS:
        raise ValueError(f"unknown model {name!r}{did_you_mean(name.replace('_', '-'), list_models())}; "
                         "run 'allconv models' for the list")
    return key


def default_config(name: str) -> dict:
    """A model's registered configuration (input_size, mean, std, interpolation, crop_pct,
    num_classes...) by its CLI, Python or ``name.tag`` name, without building the model."""
    key = name if name.split(".")[0] in VARIANTS else resolve_name(name)
    return get_pretrained_cfg(key).to_dict()


def create_model(name: str, **kwargs) -> AllConvNet:
    """Build a registered network by its CLI or Python name, through timm's registry."""

    return timm.create_model(resolve_name(name), **kwargs)


def describe(name: str | None = None, num_classes: int | None = None) -> list[dict]:
    """The registry as rows (name, exact params, paper params and error, input size, layers).

    With ``name``, one row that also lists every layer with its output (C, H, W) on the
    model's native input and its parameter count.
    """
    names = [resolve_name(name)] if name is not None else list(LAYERS)
    rows = []
    for key in names:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = create_model(key, **kwargs).eval()
        input_size = tuple(model.pretrained_cfg["input_size"])
        row = {
            "name": key.replace("_", "-"),
            "python_name": key,
            "num_classes": model.num_classes,
            "params": sum(p.numel() for p in model.parameters()),
            "paper_params": PAPER[key]["params"],
            "paper_error": PAPER[key]["error"],
            "input_size": list(input_size),
            "layer_names": model.layer_names,
        }
        if name is not None:
            row["layers"] = _layer_table(model, input_size)
        rows.append(row)
    return rows


def _layer_table(model: AllConvNet, input_size: tuple) -> list[dict]:
    layers = []
    x = torch.zeros(1, *input_size)
    with torch.no_grad():
        for layer_name, module in model.features.named_children():
            x = module(x)
            kind = type(module).__name__
            if isinstance(module, ConvBlock):
                conv = module.conv
                kind = f"{conv.kernel_size[0]}x{conv.kernel_size[1]} conv"
                kind += f" /{conv.stride[0]}" if conv.stride[0] > 1 else ""
                kind += " valid" if conv.padding[0] == 0 and conv.kernel_size[0] > 1 else ""
                kind += " + BN" if model.batch_norm else ""
                kind += " + ReLU" if isinstance(module.act, nn.ReLU) else ""
            elif isinstance(module, nn.Dropout):
                kind = f"dropout {module.p:.0%}"
            elif isinstance(module, nn.MaxPool2d):
                kind = f"{module.kernel_size}x{module.kernel_size} max-pool /{module.stride}"
            layers.append({"name": layer_name, "type": kind, "output": list(x.shape[1:]),
                           "params": sum(p.numel() for p in module.parameters())})
    layers.append({"name": "global_pool", "type": f"global average {x.shape[2]}x{x.shape[3]}",
                   "output": [x.shape[1]], "params": 0})
    return layers
