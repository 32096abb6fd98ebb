"""The paper's Fig. 3: scan a data set for each filter's most activating patches, and show
them beside their reconstructions, cropped to the filter's receptive field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli.data import datasets
from allconv_cli.data.batches import Batches
from allconv_cli.explain.methods import SALIENCY_METHODS, check_methods, check_settings
from allconv_cli.explain.saliency import saliency_maps
from allconv_cli.explain.targets import (
    Target,
    check_range,
    default_layer,
    eval_mode,
    run_to,
)
from allconv_cli.files.loading import LoadedModel
from allconv_cli.files.raw_maps import write_raw_maps
from allconv_cli.models.net import AllConvNet, ConvBlock

__all__ = ["ReceptiveField", "TopPatches", "receptive_field", "top_patches"]


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

    def rows(self) -> list[dict]:
        """One dict per filter: its layer, channel, top activation and the images scanned."""
        return [{"layer": self.layer, "channel": c, "value": v, "scanned": self.scanned}
                for c, v in zip(self.channels, self.values[:, 0].tolist())]

    def save(self, path: str | Path) -> Path:
        """Write every tensor (``files.raw_maps``, kind patches)."""
        meta = {"layer": self.layer, "scanned": self.scanned, "receptive_field": {
            "size": self.field.size, "stride": self.field.stride, "offset": self.field.offset}}
        tensors = {"values": self.values, "indices": self.indices, "labels": self.labels,
                   "positions": self.positions, "patches": self.patches, "channels": torch.tensor(self.channels)}
        return write_raw_maps(path, "patches", self.maps, tensors, meta)


def top_patches(
    model: nn.Module,
    preprocess: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layer: str,
    channels: Sequence[int] | None = None,
    top: int = 10,
    methods: Sequence[str] = ("guided",),
    progress: Callable[[int], None] | None = None,
    settings: dict[str, dict] | None = None,
) -> TopPatches:
    """The paper's Fig. 3: scan ``batches`` of (uint8 images (B, C, H, W), labels (B,)) for
    the ``top`` images whose best neuron of each filter in ``channels`` (default: the layer's
    first 8) fires most, then reconstruct that neuron on its image with each method, both
    cropped to its receptive field. Memory: the top images only, not the data set.
    ``progress(images_scanned)`` is called after each batch; ``settings``: the methods' own."""
    methods, settings = _checked_methods(methods, settings, top)
    rf = receptive_field(model, layer)
    device = next(model.parameters()).device
    best = None  # (values, stream indices, flat positions), each (k, S): running top-k per filter
    kept: dict[int, tuple[torch.Tensor, int]] = {}  # stream index -> (uint8 image, label)
    seen = 0
    for images, labels in batches:
        _check_batch(images)
        with torch.no_grad(), eval_mode(model):
            act, _ = run_to(model, preprocess(images.to(device).float() / 255), layer, through=False)
        if best is None:  # act: (B, C, h, w)
            channels = list(range(min(8, act.shape[1]))) if channels is None else list(channels)
            for c in channels:
                check_range("channel", c, act.shape[1])
        values, where = act[:, channels].flatten(2).max(2)  # (B, S): each image's best neuron per filter
        ids = torch.arange(seen, seen + len(images), device=device)[:, None].expand_as(values)
        candidates = (values, ids, where) if best is None else \
            tuple(torch.cat(pair) for pair in zip(best, (values, ids, where)))
        order = candidates[0].topk(min(top, len(candidates[0])), dim=0).indices  # (k, S)
        best = tuple(t.gather(0, order) for t in candidates)
        kept = _keep(kept, images, labels, seen, set(best[1].flatten().tolist()))
        seen += len(images)
        if progress is not None:
            progress(seen)
    if best is None:
        raise ValueError("the data set yielded no images to scan")
    values, ids, where = (t.T.cpu() for t in best)  # (S, k)
    ys, xs = where // act.shape[3], where % act.shape[3]
    n_filters, k = values.shape
    images01 = torch.stack([kept[i][0] for i in ids.flatten().tolist()]).float() / 255  # (S*k, C, H, W)
    with torch.no_grad():
        inputs, black = preprocess(images01.to(device)), preprocess(torch.zeros_like(images01[:1], device=device))
    targets = [Target(row, layer, channels[row // k], ys.flatten()[row].item(), xs.flatten()[row].item(),
                      values.flatten()[row].item()) for row in range(n_filters * k)]
    windows = [rf.window(t.y, t.x) for t in targets]
    return TopPatches(
        layer=layer, channels=channels, field=rf, scanned=seen, values=values, indices=ids,
        labels=torch.tensor([kept[i][1] for i in ids.flatten().tolist()]).view(n_filters, k),
        positions=torch.stack([ys, xs], -1),
        patches=_crop(images01, windows, rf.size, 0.5).unflatten(0, (n_filters, k)),
        maps={m: _crop(saliency_maps(model, inputs, targets, m, cam_layer=layer, settings=settings[m], black=black)
                       .cpu(), windows, rf.size, 0.0).unflatten(0, (n_filters, k)) for m in methods},
    )


def _checked_methods(methods: Sequence[str], settings: dict[str, dict] | None, top: int):
    """The scan's methods and their settings, checked: each explains a filter, and ``top`` >= 1."""
    methods = check_methods(methods)
    settings = check_settings(methods, settings)
    if top < 1:
        raise ValueError(f"--top {top}: give at least 1 patch per filter")
    if bad := [m for m in methods if SALIENCY_METHODS[m].needs_class]:
        raise ValueError(f"{', '.join(bad)} explain class scores, not filters; use backprop, deconvnet or guided")
    return methods, settings


def _check_batch(images: torch.Tensor):
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"scan batches must be uint8 (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}")


def _keep(kept: dict, images: torch.Tensor, labels: torch.Tensor, seen: int, needed: set[int]) -> dict:
    """The images the running top-k still needs (stream index -> (uint8 image, label)), this batch's added."""
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        if seen + i in needed:
            kept[seen + i] = (image.clone(), label)  # a clone frees the rest of the batch
    return {i: v for i, v in kept.items() if i in needed}


def _crop(batch: torch.Tensor, windows, size: tuple[int, int], fill: float) -> torch.Tensor:
    """Crop each of ``batch`` (N, C, H, W) at its (top, left) window of ``size``; ``fill`` outside."""
    pad_y, pad_x = size
    padded = F.pad(batch, (pad_x, pad_x, pad_y, pad_y), value=fill)
    return torch.stack([padded[i, :, top + pad_y:top + pad_y + size[0], left + pad_x:left + pad_x + size[1]]
                        for i, (top, left) in enumerate(windows)])


def scan_dataset(loaded: LoadedModel, dataset: str, split: str, data_dir: str | None, layer: str | None,
                 channels: list[int] | None, top: int, methods: Sequence[str], device: torch.device,
                 progress: Callable[[int, int], None] | None = None,
                 settings: dict[str, dict] | None = None) -> TopPatches:
    """``top_patches`` over a data set's split, fitted to ``loaded``'s input as it was trained;
    ``layer`` defaults to the last conv layer; ``progress(images scanned, images)``; ``settings``:
    the methods' own."""
    data = datasets.load_split(dataset, split, data_dir, loaded.input_size, fit=(loaded.interpolation, loaded.crop_pct))
    if not 1 <= top <= len(data):
        raise ValueError(f"--top {top}: {dataset} {split} has {len(data):,} images; give 1 to {len(data)} patches "
                         "per filter")
    count = None if progress is None else (lambda seen: progress(seen, len(data)))
    return top_patches(loaded.model, loaded.preprocess, Batches(data, 256, shuffle=False, device=device).epoch(0),
                       layer or default_layer(loaded.model), channels, top, methods, count,
                       settings=settings)
