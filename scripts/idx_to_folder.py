"""Write an MNIST-style IDX data set (MNIST, Fashion-MNIST) as an ImageFolder of grayscale PNGs.

    python scripts/idx_to_folder.py IDX_DIR OUT [--train 600] [--test 100]

IDX_DIR holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz and the t10k- pair (as
Debian's dataset-fashion-mnist package installs them in /usr/share/datasets/fashion-mnist).
Takes the first ``--train`` training and ``--test`` test images of each class, in file order,
and writes train/<label>/NNNN.png and test/<label>/NNNN.png (28x28, mode L).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

IDX_IMAGES, IDX_LABELS = 2051, 2049  # the magic numbers of the two IDX files


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzip) -> uint8 array: (N, rows, columns) images or (N,) labels."""
    data = gzip.decompress(path.read_bytes())
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise SystemExit(f"{path}: an IDX file starts with {magic}, this one with {found}")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write(source: Path, out: Path, per_class: dict[str, int]) -> Path:
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz", IDX_IMAGES)
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", IDX_LABELS)
        for label in np.unique(labels):
            folder = out / split / f"{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(images[labels == label][: per_class[split]]):
                Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=600, help="training images per class")
    parser.add_argument("--test", type=int, default=100, help="test images per class")
    arguments = parser.parse_args()
    print(write(arguments.source, arguments.out, {"train": arguments.train, "test": arguments.test}))
