"""The paper's network: one module built from a row of layer tokens (see ``registry``)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from allconv_cli.util import did_you_mean


def feature_layers(layers: list) -> list[tuple[str, int, int]]:
    """(conv name, channels, reduction) of the last conv before each change of resolution and
    of the last conv before the class conv: the maps ``features_only=True`` returns. Reduction
    is the input's side over the map's by strides (32x32 input: 1, 2, 4; the valid 3x3 conv
    shrinks 8x8 to 6x6 without a stride, so those maps count as 4)."""
    found: dict[int, tuple[str, int, int]] = {}
    reduction, n_conv = 1, 0
    for token in layers:
        if token == "M":
            reduction *= 2
        if token in ("M", "D"):
            continue
        kernel, width, stride, *_ = token
        n_conv += 1
        reduction *= stride
        if width is not None:  # the class conv's maps are the logits, not features
            found[reduction] = (f"conv{n_conv}", width, reduction)
    return list(found.values())


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
    """A network of the paper, built from a row of ``LAYERS``.

    ``features`` holds every layer up to and including the class conv, so its output is the
    (B, num_classes, h, w) map of class scores (6x6 for the CIFAR models on 32x32 input);
    the head is a global average over it. Deviations from the paper are explicit options:
    ``class_relu=False`` drops the ReLU after the class conv, ``batch_norm=True`` puts
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
    ):
        super().__init__()
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"num_classes and in_chans must be at least 1, got {num_classes} and {in_chans}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.class_relu = class_relu
        self.batch_norm = batch_norm
        self.drop_rate = drop_rate
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
            kernel, out_chs, stride, *padding = token
            is_class_conv = out_chs is None
            out_chs = num_classes if is_class_conv else out_chs
            n_conv += 1
            modules[f"conv{n_conv}"] = ConvBlock(
                width,
                out_chs,
                kernel,
                stride,
                padding[0] if padding else kernel // 2,
                relu=class_relu or not is_class_conv,
                batch_norm=batch_norm,
            )
            width = out_chs
        self.features = nn.Sequential(modules)
        self.layer_names = [name for name in modules if name.startswith("conv")]
        # timm's FeatureListNet (features_only=True) reads this: one entry per returned map
        self.feature_info = [{"num_chs": width, "reduction": reduction, "module": f"features.{name}"}
                             for name, width, reduction in feature_layers(layers)]
        self.num_features = num_classes  # the class maps are what is pooled
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                init_conv(module)

    def get_layer(self, name: str) -> ConvBlock:
        """The conv block called ``name`` (conv1..convN); its output is post-ReLU."""
        if name not in self.layer_names:
            raise ValueError(f"unknown layer {name!r}{did_you_mean(name, self.layer_names)}; "
                             f"this model has {', '.join(self.layer_names)}")
        return self.features.get_submodule(name)

    def get_classifier(self) -> nn.Module:
        return self.features.get_submodule(self.layer_names[-1]).conv

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """Replace the class conv with a fresh one of ``num_classes`` outputs (timm API)."""
        last = self.layer_names[-1]
        old = self.features.get_submodule(last).conv
        block = ConvBlock(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                          relu=self.class_relu, batch_norm=self.batch_norm)
        setattr(self.features, last, block)
        self.num_classes = self.num_features = num_classes
        init_conv(block.conv)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, num_classes, h, w) class maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean((2, 3))  # global average -> (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_conv(conv: nn.Conv2d):
    # Without BatchNorm, torch's default (Kaiming-uniform, a=sqrt(5)) init leaves the
    # 9-layer ReLU stack at chance for epochs; Xavier weights keep activations in range
    # and a small positive bias keeps ReLUs alive at the start.
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0.1)
