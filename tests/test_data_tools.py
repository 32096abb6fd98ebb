"""The scripts that build the data sets a default is measured on: glyphs-100 (rendered, 100
classes) and an IDX set (Fashion-MNIST) as an ImageFolder. Both must give what allconv reads."""

from __future__ import annotations

import gzip
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
glyphs = runpy.run_path(str(SCRIPTS / "make_glyphs.py"))
idx = runpy.run_path(str(SCRIPTS / "idx_to_folder.py"))


def test_glyphs_are_an_image_folder_allconv_reads(tmp_path):
    from allconv_cli.data import datasets

    out = subprocess.run([sys.executable, str(SCRIPTS / "make_glyphs.py"), str(tmp_path), "--classes", "5",
                          "--train", "3", "--test", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    train = datasets.load_split("imagefolder", "train", str(tmp_path), (3, 32, 32), 0)
    test = datasets.load_split("imagefolder", "test", str(tmp_path), (3, 32, 32), 0)
    assert train.classes == test.classes == [f"glyph{k:03d}" for k in range(5)]
    assert len(train) == 15 and len(test) == 10


def test_glyphs_are_the_same_for_a_seed_and_differ_by_class(tmp_path):
    first, again = glyphs["write"](tmp_path / "a", 2, 0, 3, seed=4), glyphs["write"](tmp_path / "b", 2, 0, 3, seed=4)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png")) and len(files) == 6
    for name in files:
        assert np.array_equal(np.asarray(Image.open(first / name)), np.asarray(Image.open(again / name)))
    shapes = glyphs["glyphs"](100, 0)
    gaps = np.abs(shapes[:, None] - shapes[None]).reshape(100, 100, -1).max(-1)
    assert gaps[~np.eye(100, dtype=bool)].min() > 0.05  # no two classes draw the same strokes


def test_a_glyph_image_shows_its_strokes():
    rng = np.random.default_rng(0)
    image = np.asarray(glyphs["render"](glyphs["glyphs"](1, 0)[0], rng), dtype=np.float32)
    assert image.shape == (32, 32, 3)
    centre = image[8:24, 8:24].reshape(-1, 3)
    assert np.abs(centre - np.median(centre, 0)).max() > 40  # a stroke stands out from the background


def _idx_file(path: Path, array: np.ndarray, magic: int):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_an_idx_set_becomes_an_image_folder_of_the_first_images_of_each_class(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 12), ("t10k", 6)):
        images = rng.integers(0, 256, size=(count, 28, 28))
        labels = np.arange(count) % 3
        _idx_file(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, idx["IDX_IMAGES"])
        _idx_file(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels, idx["IDX_LABELS"])
        if prefix == "train":
            first_of_class_1 = images[1]
    out = idx["write"](tmp_path, tmp_path / "folder", {"train": 2, "test": 1})
    assert sorted(p.name for p in (out / "train").iterdir()) == ["0", "1", "2"]
    assert len(list((out / "train").rglob("*.png"))) == 6 and len(list((out / "test").rglob("*.png"))) == 3
    saved = Image.open(out / "train" / "1" / "0000.png")
    assert saved.mode == "L" and np.array_equal(np.asarray(saved), first_of_class_1)


def test_a_file_that_is_not_idx_is_refused_by_name(tmp_path):
    _idx_file(tmp_path / "labels.gz", np.zeros(3), 1234)
    with pytest.raises(SystemExit, match="labels.gz: an IDX file starts with 2049, this one with 1234"):
        idx["read_idx"](tmp_path / "labels.gz", idx["IDX_LABELS"])
