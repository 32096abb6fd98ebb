"""The one loader from weights to a model ready to use (by eval, export, visualize and sanity): an
allconv checkpoint with its preprocessing, the bundled All-CNN-C, or a timm / torchvision net from a
plain safetensors state dict.

Every route returns a ``LoadedModel``: the model in eval mode on the device, the preprocessing
from [0, 1] pixels to its input, and how images are fitted to that input (size, interpolation,
crop_pct), read from the checkpoint's metadata and the model's registered configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import resolve_data_config
from torch import nn
from torchvision.models import get_model_weights

from allconv_cli.data import preprocess as preprocessing
from allconv_cli.data.images import fit_options, load_images
from allconv_cli.files.weights import load_model, load_state, resolve_weights
from allconv_cli.models.registry import (
    BUNDLED_WEIGHTS,
    NETWORKS,
    create_model,
    network_name,
    resolve_name,
)
from allconv_cli.util import did_you_mean

__all__ = ["BUNDLED_CHECKPOINT", "LoadedModel", "load_checkpoint"]

# The default of load_checkpoint: the All-CNN-C trained on CIFAR-10 that ships in the wheel
# (its path is defined once, in models); tests point this name elsewhere.
BUNDLED_CHECKPOINT = BUNDLED_WEIGHTS


@dataclass
class LoadedModel:
    """A model ready for saliency: eval mode, with its preprocessing and input size."""

    model: nn.Module
    preprocess: nn.Module  # float [0, 1] images (B, C, H, W) -> the model's input
    input_size: tuple[int, int, int]  # (C, H, W)
    classes: list[str] | None  # class names by index, when the checkpoint has them
    name: str  # e.g. all-cnn-c, resnet18
    source: str  # where the weights came from
    interpolation: str = "bilinear"  # how image files are resized to input_size (images.fit_image)
    crop_pct: float = 1.0  # the centre share of the resized image that is kept
    meta: dict | None = None  # an allconv checkpoint's metadata (dataset, epoch, augment, ...); None for others

    def read_images(self, paths: Sequence[str | Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image files -> (pixels in [0, 1], preprocessed inputs), both (B, C, H, W) on the
        model's device, fitted as the model's configuration says."""
        device = next(self.model.parameters()).device
        images = load_images(paths, self.input_size, self.interpolation, self.crop_pct).to(device)
        with torch.no_grad():
            return images, self.preprocess(images)


def load_checkpoint(
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
    interpolation, crop_pct = fit_options(getattr(model, "pretrained_cfg", None))
    return LoadedModel(
        model=model,
        preprocess=preprocessing.from_meta(meta["preprocess"], tensors).to(device),
        input_size=tuple(meta["input_size"]),
        classes=meta.get("classes"),
        name=network_name(meta["model"], meta.get("model_kwargs"))[0],
        source=source,
        interpolation=interpolation,
        crop_pct=crop_pct,
        meta=meta,
    )


def _load_foreign(name: str, checkpoint: str | Path, device) -> LoadedModel:

    path = resolve_weights(checkpoint)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if name.strip().lower().replace("-", "_") in NETWORKS:
        model = create_model(resolve_name(name))
    else:
        model = _build_by_name(name)
    if hasattr(model, "pretrained_cfg"):  # timm nets, ours included

        config = resolve_data_config({}, model=model)
        mean, std, input_size = config["mean"], config["std"], tuple(config["input_size"])
        interpolation, crop_pct = fit_options(config)
    else:  # torchvision: the size, statistics and resizing its own pretrained weights expect

        transform = get_model_weights(name).DEFAULT.transforms()
        mean, std = transform.mean, transform.std
        input_size = (3, transform.crop_size[0], transform.crop_size[0])
        interpolation = transform.interpolation.value  # e.g. "bilinear"
        crop_pct = transform.crop_size[0] / transform.resize_size[0]  # 224 / 256 = 0.875
    load_state(model, state, f"{path} does not fit {name}")
    return LoadedModel(model=model.to(device).eval(),
                       preprocess=preprocessing.Standardize(mean, std).to(device),
                       input_size=input_size, classes=None, name=name, source=str(path),
                       interpolation=interpolation, crop_pct=crop_pct)


def _build_by_name(name: str) -> nn.Module:
    """A timm net by name, else a torchvision one; both with random weights."""

    if timm.is_model(name):
        return timm.create_model(name)
    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None)
    known = timm.list_models() + torchvision.models.list_models()
    raise ValueError(f"unknown model {name!r}{did_you_mean(name, known)}: neither timm nor torchvision "
                     "has it (allconv's own nets need no --model: their checkpoints name them)")
