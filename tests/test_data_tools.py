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
    with pytest.raises(ValueError, match="labels.gz: an IDX file starts with 2049, this one with 1234"):
        idx["read_idx"](tmp_path / "labels.gz", idx["IDX_LABELS"])


def _script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True)


def _idx_set(root: Path, train: int = 6, test: int = 3, classes: int = 3) -> Path:
    root.mkdir()
    for prefix, count in (("train", train), ("t10k", test)):
        _idx_file(root / f"{prefix}-images-idx3-ubyte.gz", np.zeros((count, 28, 28)), idx["IDX_IMAGES"])
        _idx_file(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % classes, idx["IDX_LABELS"])
    return root


def _cut_short(path: Path):
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))


def _one_line_error(result: subprocess.CompletedProcess, words: str):
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1 and words in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(("args", "words"), [
    (["--train", "-1"], "argument --train: -1 is not allowed: give 1 to 100,000"),
    (["--test", "0"], "argument --test: 0 is not allowed"),
    (["--classes", "1"], "argument --classes: 1 is not allowed: give 2 to 1,000"),
    (["--classes", "ten"], "'ten' is not a whole number"),
    (["--seed", "-3"], "argument --seed: -3 is not allowed"),
    (["--colour", "red"], "unrecognized arguments: --colour red"),
])
def test_glyphs_arguments_are_checked_in_one_line(tmp_path, args, words):
    _one_line_error(_script("make_glyphs.py", tmp_path / "out", *args), words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "words"), [
    (["--train", "-5"], "argument --train: -5 is not allowed: give 1 to 1,000,000"),
    (["--test", "0"], "argument --test: 0 is not allowed"),
    (["--train", "1.5"], "'1.5' is not a whole number"),
    ([], "the following arguments are required: out"),
])
def test_idx_arguments_are_checked_in_one_line(tmp_path, args, words):
    source = _idx_set(tmp_path / "idx")
    _one_line_error(_script("idx_to_folder.py", source, *([] if not args else [tmp_path / "out"]), *args), words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("damage", "words"), [
    (lambda root: root.rename(root.with_name("elsewhere")), "is not a folder"),
    (lambda root: (root / "t10k-labels-idx1-ubyte.gz").unlink(), "t10k-labels-idx1-ubyte.gz is missing"),
    (lambda root: (root / "train-images-idx3-ubyte.gz").write_bytes(b"plain"), "is not a gzip file"),
    (lambda root: _cut_short(root / "train-images-idx3-ubyte.gz"), "cut short or damaged"),
    (lambda root: _idx_file(root / "t10k-labels-idx1-ubyte.gz", np.zeros(2), idx["IDX_LABELS"]),
     "3 test images but 2 labels"),
])
def test_a_bad_idx_folder_is_one_line(tmp_path, damage, words):
    source = _idx_set(tmp_path / "idx")
    damage(source)
    _one_line_error(_script("idx_to_folder.py", source, tmp_path / "out"), words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["make_glyphs.py", "idx_to_folder.py"])
def test_an_output_folder_is_written_whole(tmp_path, script):
    """A smaller set written where a larger one was: refused, or with --force the folder replaced
    whole, no class of the larger set left behind."""
    out = tmp_path / "out"
    larger, smaller = (["--classes", "4"], ["--classes", "2"]) if script == "make_glyphs.py" else ([], [])
    sources = [] if script == "make_glyphs.py" else [_idx_set(tmp_path / "three", classes=3),
                                                      _idx_set(tmp_path / "two", classes=2)]
    common = ["--train", "1", "--test", "1"]
    first = _script(script, *sources[:1], out, *larger, *common)
    assert first.returncode == 0, first.stderr
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    again = _script(script, *sources[1:], out, *smaller, *common)
    _one_line_error(again, "is not empty: give a new folder, or --force to replace it whole")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # untouched
    forced = _script(script, *sources[1:], out, *smaller, *common, "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(list((out / "train").iterdir())) == len(list((out / "test").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
