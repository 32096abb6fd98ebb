"""Image files in, model-sized tensors out: reading any file PIL opens into a known mode (bad
files raise ValueError), and the one fitting function that training, evaluation and
visualization share.

``fit_image`` follows timm's evaluation transform, with the interpolation and ``crop_pct`` of the
model's registered configuration (``fit_options``): the image is scaled so that it covers
``input_size / crop_pct``, then the centre ``input_size`` is cut out. allconv's nets register
bilinear and crop_pct 1.0 (CIFAR images pass untouched), All-CNN-ImageNet 0.875 (256 -> 224).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}

# PIL warns above this many pixels and raises above twice it; both mean "refuse".
Image.MAX_IMAGE_PIXELS = 89_478_485


def open_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Open ``path`` upright (EXIF orientation applied) as RGB (channels=3) or L (channels=1).

    Palette, RGBA (composited on white), CMYK, 16-bit and float images are converted. A
    missing, unreadable, truncated or decompression-bomb file raises ValueError or
    FileNotFoundError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image {path} is a folder, not an image file: give the image files in it")
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now, so truncated data fails here, not later
                img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ValueError(f"image {path} is too large (over {Image.MAX_IMAGE_PIXELS:,} pixels; "
                         "a possible decompression bomb): resize it first") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"image {path} cannot be read ({err}): is it a complete image file?") from None
    return _to_mode(img, "RGB" if channels == 3 else "L")


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float data: scale the actual range to 8 bits.
        values = np.asarray(img, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        img = Image.fromarray(scaled.round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def fit_options(pretrained_cfg: Mapping | None) -> tuple[str, float]:
    """(interpolation, crop_pct) from a timm ``pretrained_cfg``; bilinear and 1.0 where it has none."""
    cfg = pretrained_cfg or {}
    return cfg.get("interpolation") or "bilinear", float(cfg.get("crop_pct") or 1.0)


def fit_image(img: Image.Image, input_size: Sequence[int], interpolation: str = "bilinear",
              crop_pct: float = 1.0) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W) at ``input_size`` (C, H, W): scaled (PIL's antialiased
    ``interpolation``) so that it covers (H, W) / ``crop_pct``, then center-cropped to (H, W);
    the longer side loses equal margins. An image already at the scaled size is not resampled.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; use one of {', '.join(INTERPOLATIONS)}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct {crop_pct} must be in (0, 1]")
    channels, height, width = input_size
    img = img.convert("RGB" if channels == 3 else "L")
    scale = max(width / img.width, height / img.height) / crop_pct
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    if img.size != size:
        img = img.resize(size, INTERPOLATIONS[interpolation])
    left, top = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((left, top, left + width, top + height))
    array = np.asarray(img, dtype=np.uint8).reshape(height, width, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_images(paths: Sequence[str | Path], input_size: Sequence[int], interpolation: str = "bilinear",
                crop_pct: float = 1.0) -> torch.Tensor:
    """Image files -> float [0, 1] tensor (B, C, H, W), each read by ``open_image`` and fitted
    by ``fit_image``."""
    return torch.stack([fit_image(open_image(path, input_size[0]), input_size, interpolation, crop_pct)
                        for path in paths]).float() / 255
