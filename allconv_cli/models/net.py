"""The paper's network: one module built from a row of layer tokens (see ``registry``).

No ``from __future__ import annotations`` here: torch.fx copies ``forward``'s annotations into the
code of a traced graph, and TorchScript cannot read them as strings.
"""

from collections import OrderedDict

import torch
from torch import nn

from allconv_cli.util import did_you_mean

GLOBAL_POOLS = ("avg", "")  # timm's names: the paper's global average, or none (maps unpooled)


def _padding(token) -> int:
    """A conv token's padding: its fourth value, else "same" (kernel // 2)."""
    return token[3] if len(token) > 3 else token[0] // 2


def _changes_size(token) -> bool:
    """Whether a token changes the side of the maps: a pool, a stride or an unpadded conv."""
    if token in ("M", "D"):
        return token == "M"
    kernel, _, stride, *_ = token
    return stride > 1 or _padding(token) * 2 != kernel - 1


def feature_layers(layers: list) -> list[tuple[str, int, int]]:
    """(conv name, channels, reduction) of the last conv before each change of map size (a pool,
    a stride, the head's unpadded 3x3 conv) and of the last conv before the class conv: the maps
    ``features_only=True`` returns. Reduction is the input's side over the map's by strides
    (All-CNN-C on 32x32 input: conv2 1, conv5 2, conv6 4 (8x8), conv8 4 (6x6): the valid conv
    shrinks 8x8 to 6x6 without a stride)."""
    found: list[tuple[str, int, int]] = []
    last, reduction, n_conv = None, 1, 0
    for token in layers:
        is_class_conv = token not in ("M", "D") and token[1] is None
        if last is not None and (_changes_size(token) or is_class_conv):
            found.append(last)
            last = None
        if token == "M":
            reduction *= 2
        if token in ("M", "D") or is_class_conv:
            continue
        kernel, width, stride, *_ = token
        n_conv += 1
        reduction *= stride
        last = (f"conv{n_conv}", width, reduction)
    return found


class ConvBlock(nn.Module):
    """conv -> (BatchNorm, off by default) -> ReLU (Identity for a class conv without ReLU)."""

    def __init__(self, in_chs, out_chs, kernel, stride=1, padding=0, relu=True, batch_norm=False):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, padding, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_chs) if batch_norm else nn.Identity()
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class AllConvNet(nn.Module):
    """A network of the paper, built from a row of layer tokens (``registry.NETWORKS``).

    ``features`` holds every layer up to and including the class conv block (conv [+ BN]
    [+ ReLU]), named as the paper numbers them, so that checkpoints keep one set of keys
    (``features.conv9.conv.weight``). timm's split of the same layers:
    ``forward_features`` runs every layer before the class block ((B, num_features, 6, 6) for
    the CIFAR nets on 32x32 input), ``forward_head`` the class block, then the global average
    ((B, num_classes)). With ``num_classes=0`` (or after ``reset_classifier(0)``) the class
    block is an Identity and the model returns the pooled (B, num_features) features;
    ``global_pool=''`` leaves the maps unpooled. Deviations from the paper are explicit
    options: ``class_relu=False`` drops the ReLU after the class conv, ``batch_norm=True`` puts
    BatchNorm after every conv (and removes the conv biases it makes redundant).
    """

    def __init__(
        self,
        layers: list,
        num_classes: int = 10,
        in_chans: int = 3,
        class_relu: bool = True,
        batch_norm: bool = False,
        drop_input: float = 0.2,
        drop_rate: float = 0.5,
        global_pool: str = "avg",
    ):
        super().__init__()
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"num_classes must be at least 0 and in_chans at least 1, got {num_classes} and {in_chans}")
        self.in_chans = in_chans
        self.class_relu = class_relu
        self.batch_norm = batch_norm
        self.drop_rate = drop_rate
        self.global_pool = _check_pool(global_pool)
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        if drop_input > 0:
            modules["input_drop"] = nn.Dropout(drop_input)
        width, n_conv, n_pool, n_drop = in_chans, 0, 0, 0
        for token in layers:
            if token == "M":
                n_pool += 1
                modules[f"pool{n_pool}"] = nn.MaxPool2d(3, stride=2, padding=1)
            if token in ("M", "D"):
                n_drop += 1
                modules[f"drop{n_drop}"] = nn.Dropout(drop_rate)
                continue
            kernel, out_chs, stride, *_ = token
            n_conv += 1
            if out_chs is None:  # the class conv: the row's last token
                self.class_conv = (f"conv{n_conv}", kernel, stride, _padding(token))
                break
            modules[f"conv{n_conv}"] = ConvBlock(width, out_chs, kernel, stride, _padding(token), batch_norm=batch_norm)
            width = out_chs
        self.num_features = self.head_hidden_size = width  # what the class conv reads, pooled for pre_logits
        self.num_body = len(modules)  # the layers forward_features runs
        self.features = nn.Sequential(modules)
        self._set_class_block(num_classes)
        # timm's FeatureListNet (features_only=True) reads this: one entry per returned map
        self.feature_info = [{"num_chs": chs, "reduction": reduction, "module": f"features.{name}"}
                             for name, chs, reduction in feature_layers(layers)]
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                init_conv(module)

    def _set_class_block(self, num_classes: int) -> nn.Module:
        """Put a class conv [+ BN] [+ ReLU] of ``num_classes`` outputs (an Identity for 0: no
        classifier) last in ``features``, in place of the one there -> the new block."""
        name, kernel, stride, padding = self.class_conv
        block = nn.Identity() if num_classes == 0 else ConvBlock(
            self.num_features, num_classes, kernel, stride, padding, relu=self.class_relu, batch_norm=self.batch_norm)
        self.features.add_module(name, block)  # an existing name keeps its place
        self.num_classes = num_classes
        self.layer_names = [name for name, m in self.features.named_children() if isinstance(m, ConvBlock)]
        return block

    def get_layer(self, name: str) -> ConvBlock:
        """The conv block called ``name`` (conv1..convN); its output is post-ReLU."""
        if name not in self.layer_names:
            raise ValueError(f"unknown layer {name!r}{did_you_mean(name, self.layer_names)}; "
                             f"this model has {', '.join(self.layer_names)}")
        return self.features.get_submodule(name)

    def get_classifier(self) -> nn.Module:
        """The class conv (an Identity once the classifier is reset to 0 classes)."""
        block = self.features.get_submodule(self.class_conv[0])
        return block.conv if isinstance(block, ConvBlock) else block

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """A fresh class block of ``num_classes`` outputs (0: none); ``global_pool`` "avg" or ""
        (timm API)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be at least 0, got {num_classes}")
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        block = self._set_class_block(num_classes)
        if isinstance(block, ConvBlock):
            init_conv(block.conv)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # A loop with a test rather than a slice of ``features``: TorchScript cannot call a slice.
        for index, layer in enumerate(self.features):
            if index < self.num_body:
                x = layer(x)
        return x  # (B, num_features, h, w): (B, 192, 6, 6) for the CIFAR nets on 32x32 input

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not pre_logits:
            x = self.features[-1](x)  # the class block: (B, num_classes, h, w) class maps
        if self.global_pool == "avg":
            x = x.mean((2, 3))  # global average -> (B, num_classes), or (B, num_features) for pre_logits
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be 'avg' (the paper's global average) or '' (maps unpooled), "
                         f"got {global_pool!r}")
    return global_pool


def init_conv(conv: nn.Conv2d):
    # Without BatchNorm, torch's default (Kaiming-uniform, a=sqrt(5)) init leaves the
    # 9-layer ReLU stack at chance for epochs; Xavier weights keep activations in range
    # and a small positive bias keeps ReLUs alive at the start.
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0.1)
