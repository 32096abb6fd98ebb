"""Reading one image file, whatever PIL can open, into a known mode; bad files raise ValueError."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# PIL warns above this many pixels and raises above twice it; both mean "refuse".
Image.MAX_IMAGE_PIXELS = 89_478_485


def open_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Open ``path`` upright (EXIF orientation applied) as RGB (channels=3) or L (channels=1).

    Palette, RGBA (composited on white), CMYK, 16-bit and float images are converted. A
    missing, unreadable, truncated or decompression-bomb file raises ValueError or
    FileNotFoundError naming the file.
    """
    path = Path(path)
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
