"""The paper's networks as one timm registry: a table of rows, one builder, one registered
function per row.

A row (``Network``) is a list of layer tokens read left to right, and optional data about it:

- ``(kernel, width, stride)`` or ``(kernel, width, stride, padding)``: a conv + ReLU. Padding
  defaults to "same" (``kernel // 2``); the head's 3x3 conv is unpadded ("valid", 8x8 -> 6x6).
  ``width=None`` is the class conv (``num_classes`` outputs), always the last token.
- ``"M"``: 3x3 max-pool, stride 2, padding 1 (32 -> 16 -> 8), followed by dropout.
- ``"D"``: dropout after a conv that replaces a pool (strided and All-CNN models).

Both dropouts take the rate ``drop_rate``: AllConvNet's default is the paper's 50 %, and a run
sets its own (``allconv train --drop-rate``; the default recipe's is 0).

Convolutions are named conv1..convN in order, as in the paper, and are addressable by those
names (``model.get_layer("conv6")``). Where this file and the paper's PDF disagree, the PDF wins.

Adding a network, or a variant with options or weights of its own, is one row of ``NETWORKS``:
its timm function, default configuration, command-line name and ``allconv models`` line follow
from it. ``all_cnn_c_bn`` is such a variant (All-CNN-C with BatchNorm and its own dropout), and
``timm.create_model("all_cnn_c_bn", pretrained=True)`` loads the bundled CIFAR-10 weights from
the package, offline.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
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


BUNDLED_WEIGHTS = Path(__file__).parents[1] / "assets" / "all-cnn-c-cifar10.safetensors"


# The per-channel standardization the bundled weights were trained with (the training split of
# the CIFAR-10 JPEG copy), as recorded in the file's allconv metadata; a test keeps them equal.
BUNDLED_MEAN = (0.4912503957748413, 0.4820902943611145, 0.44652095437049866)


BUNDLED_STD = (0.24523161351680756, 0.24278154969215393, 0.26062875986099243)


@dataclass(frozen=True)
class Network:
    """A row of the registry: the layers, and what else is known about the network."""

    layers: list  # tokens, see the module's docstring
    family: str | None = None  # Table 3's block (a, b or c): what 'allconv ablate --family' trains
    paper_params: str | None = None  # the paper's rounded parameter count, where it gives one
    # the paper's test error (%) by data set: cifar10 (no augmentation), cifar10-aug (flips and
    # translations), cifar100, imagenet (top-1); empty where the paper has no figure
    paper_error: dict[str, float] = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # AllConvNet options; keyword arguments override them
    cfg: dict = field(default_factory=dict)  # timm configuration beyond the CIFAR-10 one (_cfg)
    tag: str = ""  # the configuration's tag where it has weights: all_cnn_c_bn.cifar10

    @property
    def is_papers(self) -> bool:
        """One of the paper's networks: it gives a figure or a parameter count for it."""
        return bool(self.paper_error or self.paper_params)


_HEAD = [(3, 192, 1, 0), (1, 192, 1), (1, None, 1)]  # 8x8 -> 6x6, 1x1, 1x1 to classes


ALL_CNN_C = [(3, 96, 1), (3, 96, 1), (3, 96, 2), "D", (3, 192, 1), (3, 192, 1), (3, 192, 2), "D", *_HEAD]


# Table 1: base models. Table 2: Strided- (stride on the conv before each pool), ConvPool- (extra
# 3x3 conv before each pool), All-CNN- (pool replaced by 3x3 stride-2 conv). The paper's figures
# are its rounded parameter counts and test errors (Tables 3-5, appendix).
NETWORKS: dict[str, Network] = {
    "model_a": Network([(5, 96, 1), "M", (5, 192, 1), "M", *_HEAD], "a", "~0.9 M", {"cifar10": 12.47}),
    "strided_cnn_a": Network([(5, 96, 2), "D", (5, 192, 2), "D", *_HEAD], "a", "~0.9 M", {"cifar10": 13.46}),
    "convpool_cnn_a": Network([(5, 96, 1), (3, 96, 1), "M", (5, 192, 1), (3, 192, 1), "M", *_HEAD],
                              "a", "~1.28 M", {"cifar10": 10.21}),
    "all_cnn_a": Network([(5, 96, 1), (3, 96, 2), "D", (5, 192, 1), (3, 192, 2), "D", *_HEAD],
                         "a", "~1.28 M", {"cifar10": 10.30}),
    "model_b": Network([(5, 96, 1), (1, 96, 1), "M", (5, 192, 1), (1, 192, 1), "M", *_HEAD],
                       "b", "~1 M", {"cifar10": 10.20}),
    "strided_cnn_b": Network([(5, 96, 1), (1, 96, 2), "D", (5, 192, 1), (1, 192, 2), "D", *_HEAD],
                             "b", "~1 M", {"cifar10": 10.98}),
    "convpool_cnn_b": Network([(5, 96, 1), (1, 96, 1), (3, 96, 1), "M", (5, 192, 1), (1, 192, 1), (3, 192, 1), "M",
                               *_HEAD], "b", "~1.35 M", {"cifar10": 9.33}),
    "all_cnn_b": Network([(5, 96, 1), (1, 96, 1), (3, 96, 2), "D", (5, 192, 1), (1, 192, 1), (3, 192, 2), "D",
                          *_HEAD], "b", "~1.35 M", {"cifar10": 9.10}),
    "model_c": Network([(3, 96, 1), (3, 96, 1), "M", (3, 192, 1), (3, 192, 1), "M", *_HEAD],
                       "c", "~1.3 M", {"cifar10": 9.74}),
    "strided_cnn_c": Network([(3, 96, 1), (3, 96, 2), "D", (3, 192, 1), (3, 192, 2), "D", *_HEAD],
                             "c", "~1.3 M", {"cifar10": 10.19}),
    "convpool_cnn_c": Network([(3, 96, 1), (3, 96, 1), (3, 96, 1), "M", (3, 192, 1), (3, 192, 1), (3, 192, 1), "M",
                               *_HEAD], "c", "~1.4 M", {"cifar10": 9.31}),
    "all_cnn_c": Network(ALL_CNN_C, "c", "~1.4 M", {"cifar10": 9.08, "cifar10-aug": 7.25, "cifar100": 33.71}),
    # Appendix: an upscaled All-CNN-B for 224x224 input with one dropout, after conv9. The paper
    # gives no padding; we pad every conv "same", so the maps are 56 -> 28 -> 14 -> 7 and the
    # global average is 7x7.
    "all_cnn_imagenet": Network(
        [(11, 96, 4), (1, 96, 1), (3, 96, 2),
         (5, 256, 1), (1, 256, 1), (3, 256, 2),
         (3, 384, 1), (1, 384, 1), (3, 384, 2), "D",
         (3, 1024, 1), (1, 1024, 1), (1, None, 1)],
        paper_params="< 10 M", paper_error={"imagenet": 41.2}, options={"drop_input": 0.0},
        cfg={"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
             "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD},
    ),
    # A deviation with weights of its own, not in the paper: the bundled weights' network. On the
    # command line the same layers are --model all-cnn-c --batch-norm --drop-input 0 --drop-rate 0.25.
    "all_cnn_c_bn": Network(
        ALL_CNN_C, options={"batch_norm": True, "drop_input": 0.0, "drop_rate": 0.25}, tag="cifar10",
        cfg={"file": str(BUNDLED_WEIGHTS), "mean": BUNDLED_MEAN, "std": BUNDLED_STD, "label_names": CIFAR10_CLASSES,
             "notes": ("All-CNN-C with BatchNorm (a deviation), trained by allconv on the CIFAR-10 JPEG copy "
                       "with flips and translations: 9.97 % top-1 error on its 10,000 test images",)},
    ),
}


# The AllConvNet options a training run sets (allconv train --batch-norm, --drop-rate, ...).
MODEL_OPTIONS = ("batch_norm", "class_relu", "drop_input", "drop_rate")


def model_options(name: str, paper: bool = False) -> dict:
    """A network's MODEL_OPTIONS as timm builds it without keyword arguments: AllConvNet's defaults
    (the paper's All-CNN design), then its row's own (all-cnn-c-bn: BatchNorm, no input dropout,
    25 %). ``paper``: as the paper has it, so a variant's own options (its deviations) are left out
    and only a row of the paper's brings its own (all-cnn-imagenet's single dropout)."""
    row = NETWORKS[resolve_name(name)]
    defaults = inspect.signature(AllConvNet).parameters
    own = row.options if row.is_papers or not paper else {}
    return {key: own.get(key, defaults[key].default) for key in MODEL_OPTIONS}


# How network_name shows an option that differs from its row's: (if on, if off) or a rate's words.
_SHOWN = {"batch_norm": ("BatchNorm", "no BatchNorm"), "class_relu": ("class ReLU", "no class ReLU"),
          "drop_input": "input dropout", "drop_rate": "dropout"}


def network_name(name: str, options: dict | None = None) -> tuple[str, bool]:
    """A network as built with keyword arguments ``options`` (a run's model_kwargs) -> its name as
    shown wherever a run's network is named, and whether it is the paper's. Its row's name where
    ``options`` build it as the row is (``allconv models NAME``, ``timm.create_model(NAME)``), or
    the row of the same layers that they build so, else that name and what differs: "all-cnn-c
    (BatchNorm, input dropout 0 %, dropout 0 %)". The paper's (only then is its error shown
    beside it): one of its rows, built as the paper has it."""
    own = model_options(name)
    built = {key: (options or {}).get(key, own[key]) for key in MODEL_OPTIONS}
    # the row that builds it as it is, this one or another of the same layers (all-cnn-c with
    # all-cnn-c-bn's options is all-cnn-c-bn)
    same = [key for key, row in NETWORKS.items() if row.layers == NETWORKS[resolve_name(name)].layers
            and model_options(key) == built]
    key = resolve_name(name) if resolve_name(name) in same or not same else same[0]
    differs = [shown[not built[option]] if isinstance(shown, tuple) else f"{shown} {100 * built[option]:g} %"
               for option, shown in _SHOWN.items() if built[option] != model_options(key)[option]]
    plain = key.replace("_", "-")
    return (f"{plain} ({', '.join(differs)})" if differs else plain), NETWORKS[key].is_papers and not differs


def _cfg(network: Network) -> dict:
    """A row's timm configuration: CIFAR-10's, then the row's own."""
    n_convs = sum(token not in ("M", "D") for token in network.layers)
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (6, 6),  # the maps forward_features returns on that input
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "features.conv1.conv",
        "classifier": f"features.conv{n_convs}.conv",  # the class conv is the last
        "license": "mit",
        "paper_ids": "arXiv:1412.6806",
        "paper_name": "Striving for Simplicity: The All Convolutional Net",
        **network.cfg,
    }


# the first tag of a name is its default: timm.create_model("all_cnn_c_bn", pretrained=True)
default_cfgs = generate_default_cfgs({".".join(filter(None, (name, network.tag))): _cfg(network)
                                      for name, network in NETWORKS.items()})


def pretrained_names() -> list[str]:
    """The registered ``name.tag`` entries that have weights, e.g. ``all_cnn_c_bn.cifar10``."""
    return [f"{name}.{tag}" for name, entry in default_cfgs.items() for tag, cfg in entry.cfgs.items() if cfg.file]


def _create(name: str, pretrained: bool = False, **kwargs) -> AllConvNet:
    network = NETWORKS[name]
    kwargs = {**network.options, **kwargs}
    if pretrained:
        cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not any(getattr(cfg, key) for key in ("file", "url", "hf_hub_id", "state_dict")):
            raise ValueError(f"{name} has no pretrained weights; {', '.join(pretrained_names())} has them: "
                             f"timm.create_model({pretrained_names()[0].split('.')[0]!r}, pretrained=True), "
                             "or pass pretrained_cfg_overlay=dict(file=...) for your own")
    levels = len(feature_layers(network.layers))
    return build_model_with_cfg(AllConvNet, name, pretrained, layers=network.layers,
                                feature_cfg={"flatten_sequential": True, "out_indices": tuple(range(levels))},
                                pretrained_filter_fn=_fit_class_block, **kwargs)


def _fit_class_block(state_dict: dict, model: AllConvNet) -> dict:
    """Drop the class block's tensors that do not fit (another number of classes, or none):
    timm drops the class conv's weight and bias itself, but not the BatchNorm after it."""
    prefix, own = f"features.{model.class_conv[0]}.", model.state_dict()
    return {key: value for key, value in state_dict.items()
            if not (key.startswith(prefix) and (key not in own or own[key].shape != value.shape))}


def _entrypoint(name: str):
    """The registered function of a row, as timm's own are written by hand: named as the row."""

    def entrypoint(pretrained: bool = False, **kwargs) -> AllConvNet:
        return _create(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name}: a row of allconv_cli.models.registry.NETWORKS, built as an AllConvNet."
    return register_model(entrypoint)


# One module attribute per row (model_a, ..., all_cnn_c_bn), as @register_model leaves them.
globals().update({name: _entrypoint(name) for name in NETWORKS})


def list_models() -> list[str]:
    """The registered names as users type them on the command line (``all-cnn-c``), in the
    table's order: the paper's, then the variants."""
    return [name.replace("_", "-") for name in NETWORKS]


def resolve_name(name: str) -> str:
    """``all-cnn-c`` or ``all_cnn_c`` -> ``all_cnn_c``; an unknown name raises with a hint."""
    key = name.strip().lower().replace("-", "_")
    if key not in NETWORKS:
        raise ValueError(f"unknown model {name!r}{did_you_mean(name.replace('_', '-'), list_models())}; "
                         "run 'allconv models' for the list")
    return key


def default_config(name: str) -> dict:
    """A model's registered configuration (input_size, mean, std, interpolation, crop_pct,
    num_classes...) by its CLI, Python or ``name.tag`` name, without building the model."""
    base, dot, tag = name.partition(".")
    key = resolve_name(base) + dot + tag
    if dot and key not in pretrained_names():
        raise ValueError(f"unknown tag {name!r}: the tagged names are {', '.join(pretrained_names())}")
    return get_pretrained_cfg(key).to_dict()


def create_model(name: str, **kwargs) -> AllConvNet:
    """Build a registered network by its CLI or Python name, through timm's registry."""

    return timm.create_model(resolve_name(name), **kwargs)


# Classes of --num-classes: ImageNet-21k, the largest label set in common use, has 21,841.
MAX_CLASSES = 100_000


def describe(name: str | None = None, num_classes: int | None = None) -> list[dict]:
    """The registry as rows (name, family, exact params, the paper's params and errors where it
    gives them, input size, layers).

    With ``name``, one row that also lists every layer with its output (C, H, W) on the
    model's native input and its parameter count.
    """
    if num_classes is not None and not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"--num-classes {num_classes} is not allowed: it takes 2 to {MAX_CLASSES:,} classes")
    names = [resolve_name(name)] if name is not None else list(NETWORKS)
    rows = []
    for key in names:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = create_model(key, **kwargs).eval()
        input_size = tuple(model.pretrained_cfg["input_size"])
        row = {
            "name": key.replace("_", "-"),
            "python_name": key,
            "family": NETWORKS[key].family,
            "num_classes": model.num_classes,
            "params": sum(p.numel() for p in model.parameters()),
            "paper_params": NETWORKS[key].paper_params,
            "paper_error": NETWORKS[key].paper_error,
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
            if isinstance(module, nn.Identity):  # the class block's place at 0 classes: no layer
                continue
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
