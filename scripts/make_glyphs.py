"""Render glyphs-100: a 100-class set of 32x32 colour images, written as an ImageFolder.

    python scripts/make_glyphs.py OUT [--train 60] [--test 20] [--classes 100] [--seed 0] [--force]

Each class is a glyph of three strokes (quadratic curves through points drawn once per class
from the seed); each image draws its class's glyph turned (up to 20 degrees), scaled (0.75 to
1.05), moved (up to 3 px) and stroked 2 to 3 px wide, in a random colour on a random two-colour
gradient, with pixel noise. Shape tells the classes apart; colour, place and size do not. It
needs only numpy and Pillow (no fonts, nothing downloaded), so a test can build it anywhere, and
unlike CIFAR it has 100 classes: the case of a user's ``--dataset cifar100`` that allconv must
learn. Writes train/<class>/NNNN.png and test/<class>/NNNN.png; OUT is written whole: a folder
that holds anything is replaced only with --force, and nothing of it stays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from allconv_cli.util import ScriptArguments, count_argument, write_folder

SIZE = 32
SUPERSAMPLE = 4  # drawn at 128 px, then reduced: smooth strokes
STROKES = 3
CURVE_POINTS = 12  # points along each quadratic curve


def glyphs(classes: int, seed: int) -> np.ndarray:
    """(classes, STROKES, 3, 2) control points in [0.2, 0.8]^2, distinct per class."""
    return np.random.default_rng(seed).uniform(0.2, 0.8, size=(classes, STROKES, 3, 2))


def _curve(points: np.ndarray) -> np.ndarray:
    """A quadratic Bezier curve through 3 control points -> (CURVE_POINTS, 2)."""
    t = np.linspace(0, 1, CURVE_POINTS)[:, None]
    return (1 - t) ** 2 * points[0] + 2 * (1 - t) * t * points[1] + t**2 * points[2]


def render(glyph: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One 32x32 RGB image of ``glyph`` (STROKES, 3, 2), varied by ``rng``."""
    side = SIZE * SUPERSAMPLE
    start, end = rng.integers(0, 256, size=(2, 3))
    wide = side * 3 // 2  # a gradient drawn wider than the image, turned, then cut to size: no empty corners
    ramp = np.linspace(0, 1, wide)[:, None, None]
    background = Image.fromarray((start + (end - start) * ramp).repeat(wide, axis=1).astype(np.uint8))
    margin = (wide - side) // 2
    image = background.rotate(float(rng.uniform(0, 360))).crop((margin, margin, margin + side, margin + side))
    angle = np.deg2rad(rng.uniform(-20, 20))
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale, shift = rng.uniform(0.75, 1.05), rng.uniform(-3, 3, size=2) / SIZE
    ink = tuple(int(v) for v in rng.integers(0, 256, size=3))
    width = int(rng.uniform(2, 3) * SUPERSAMPLE)
    draw = ImageDraw.Draw(image)
    for stroke in glyph:
        points = ((_curve(stroke) - 0.5) @ turn.T * scale + 0.5 + shift) * side
        draw.line([tuple(p) for p in points], fill=ink, width=width, joint="curve")
    small = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    small = small + rng.normal(0, 8, size=small.shape)
    return Image.fromarray(small.clip(0, 255).astype(np.uint8))


def write(out: Path, train: int, test: int, classes: int = 100, seed: int = 0, replace: bool = False) -> Path:
    """Write ``train`` and ``test`` images of each class as the image folder ``out`` -> ``out``."""
    shapes = glyphs(classes, seed)
    rng = np.random.default_rng(seed + 1)

    def fill(folder: Path):
        for split, count in (("train", train), ("test", test)):
            for label, glyph in enumerate(shapes):
                (folder / split / f"glyph{label:03d}").mkdir(parents=True)
                for index in range(count):
                    render(glyph, rng).save(folder / split / f"glyph{label:03d}" / f"{index:04d}.png")

    return write_folder(out, fill, replace)


if __name__ == "__main__":
    parser = ScriptArguments(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=count_argument(1, 100_000), default=60, help="training images per class")
    parser.add_argument("--test", type=count_argument(1, 100_000), default=20, help="test images per class")
    parser.add_argument("--classes", type=count_argument(2, 1_000), default=100)
    parser.add_argument("--seed", type=count_argument(0, 2**63 - 2), default=0)
    parser.add_argument("--force", action="store_true", help="replace OUT whole where it holds anything")
    arguments = parser.parse_args()
    try:
        print(write(arguments.out, arguments.train, arguments.test, arguments.classes, arguments.seed, arguments.force))
    except OSError as err:
        parser.exit(2, f"Error: {err}\n")
