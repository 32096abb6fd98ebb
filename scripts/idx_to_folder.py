"""Write an MNIST-style IDX data set (MNIST, Fashion-MNIST) as an ImageFolder of grayscale PNGs.

    python scripts/idx_to_folder.py IDX_DIR OUT [--train 600] [--test 100] [--force]

IDX_DIR holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz and the t10k- pair (as
Debian's dataset-fashion-mnist package installs them in /usr/share/datasets/fashion-mnist).
Takes the first ``--train`` training and ``--test`` test images of each class, in file order,
and writes train/<label>/NNNN.png and test/<label>/NNNN.png (28x28, mode L). OUT is written
whole: a folder that holds anything is replaced only with --force, and nothing of it stays.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from allconv_cli.util import ScriptArguments, count_argument, write_folder

IDX_IMAGES, IDX_LABELS = 2051, 2049  # the magic numbers of the two IDX files


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzip) -> uint8 array: (N, rows, columns) images or (N,) labels; ValueError
    naming the file where it is missing, not gzip, not IDX or cut short."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: IDX_DIR needs the four files train-images-idx3-ubyte.gz, "
                         "train-labels-idx1-ubyte.gz and the t10k- pair")
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a gzip file ({err}): give the .gz files as distributed") from None
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: an IDX file starts with {magic}, this one with {found}")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    if len(data) != 4 + 4 * dims + int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(data) - 4 - 4 * dims:,} bytes of data for a shape of {shape}: "
                         "the file is cut short or damaged")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write(source: Path, out: Path, per_class: dict[str, int], replace: bool = False) -> Path:
    """The first ``per_class[split]`` images of each class of both splits, as an image folder ``out``."""
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder: give the folder that holds the IDX files")
    splits = {split: (read_idx(source / f"{prefix}-images-idx3-ubyte.gz", IDX_IMAGES),
                      read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", IDX_LABELS))
              for split, prefix in (("train", "train"), ("test", "t10k"))}
    for split, (images, labels) in splits.items():
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images):,} {split} images but {len(labels):,} labels")

    def fill(folder: Path):
        for split, (images, labels) in splits.items():
            for label in np.unique(labels):
                (folder / split / f"{label}").mkdir(parents=True)
                for index, image in enumerate(images[labels == label][: per_class[split]]):
                    Image.fromarray(image, mode="L").save(folder / split / f"{label}" / f"{index:04d}.png")

    return write_folder(out, fill, replace)


if __name__ == "__main__":
    parser = ScriptArguments(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=count_argument(1, 1_000_000), default=600, help="training images per class")
    parser.add_argument("--test", type=count_argument(1, 1_000_000), default=100, help="test images per class")
    parser.add_argument("--force", action="store_true", help="replace OUT whole where it holds anything")
    arguments = parser.parse_args()
    try:
        print(write(arguments.source, arguments.out, {"train": arguments.train, "test": arguments.test},
                    arguments.force))
    except (ValueError, OSError) as err:
        parser.exit(2, f"Error: {err}\n")
