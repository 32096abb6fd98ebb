"""The decode cache of ImageFolder splits (allconv_cli.data.cache, issue #39): a second load
reads the cache instead of decoding; a changed folder, a corrupt entry or concurrent runs never
give stale or broken images; `ALLCONV_CACHE_DIR=off` and an unwritable folder only turn it off."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allconv_cli.data import cache, datasets, folders, splits

SIZE = (3, 8, 8)


def image_folder(root: Path, per_class: int = 3) -> Path:
    """``root/{train,test}/{cat,dog}/``: PNGs and a JPEG of 12x10 random pixels each."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                suffix = "jpg" if i == 0 else "png"
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.{suffix}")
    return root


def load(root: Path, fit=("bilinear", 1.0)) -> splits.ImageData:
    return datasets.load_split("imagefolder", "train", root, SIZE, workers=1, fit=fit)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("ALLCONV_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """How many images each decode of a split made (one item per cache miss)."""
    calls, real = [], folders.decode_files
    monkeypatch.setattr(folders, "decode_files", lambda folder, workers: calls.append(len(folder)) or
                        real(folder, workers))
    return calls


def refuse_to_decode(folder, workers):
    raise AssertionError("decoded again: the cache was not read")


def assert_same(a: splits.ImageData, b: splits.ImageData):
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes


def test_a_second_load_reads_the_cache(tmp_path, cache_dir, monkeypatch):
    root = image_folder(tmp_path / "data")
    first = load(root)
    assert first.images.shape == (6, *SIZE) and first.images.dtype == torch.uint8
    assert [name.endswith(".safetensors") for name in entries(cache_dir)] == [True]
    monkeypatch.setattr(folders, "decode_files", refuse_to_decode)
    assert_same(load(root), first)


def test_other_fit_options_are_other_entries(tmp_path, cache_dir, decodes):
    root = image_folder(tmp_path / "data")
    bilinear, bicubic = load(root), load(root, ("bicubic", 0.5))
    assert decodes == [6, 6] and len(entries(cache_dir)) == 2
    assert not torch.equal(bilinear.images, bicubic.images)
    assert_same(load(root, ("bicubic", 0.5)), bicubic)
    assert decodes == [6, 6]


def grow(path: Path):
    with open(path, "ab") as f:
        f.write(b"\0")  # PIL ignores bytes after a PNG's end


def touch_later(path: Path):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def add_image(path: Path):
    Image.new("RGB", (12, 10), (255, 0, 0)).save(path.parent / "new.png")


@pytest.mark.parametrize("change", [grow, touch_later, add_image], ids=["size", "mtime", "a new file"])
def test_a_changed_folder_is_decoded_again(tmp_path, cache_dir, decodes, change):
    root = image_folder(tmp_path / "data")
    load(root)
    name = entries(cache_dir)
    change(root / "train" / "dog" / "1.png")
    changed = load(root)
    assert decodes == [6, len(changed)] and len(changed) == (7 if change is add_image else 6)
    assert entries(cache_dir) == name  # rewritten in place, not a second entry beside the stale one
    assert_same(load(root), changed)
    assert len(decodes) == 2


def same_size_png(path: Path, colour: tuple[int, int, int]):
    """A 12x10 PNG stored without compression: every colour gives a file of the same size."""
    Image.new("RGB", (12, 10), colour).save(path, format="PNG", compress_level=0)


@pytest.mark.parametrize("in_place", [True, False], ids=["rewritten in place", "replaced by a copy"])
def test_a_same_size_copy_with_its_mtime_kept_is_decoded_again(tmp_path, cache_dir, decodes, in_place):
    """``cp -p``, ``rsync -a`` or ``tar x``: same size, mtime set back; the inode or ctime differs."""
    root = image_folder(tmp_path / "data")
    target = root / "train" / "dog" / "1.png"
    same_size_png(target, (255, 0, 0))
    before = load(root)
    kept = target.stat()
    copy = tmp_path / "copy.png"
    same_size_png(copy, (0, 0, 255))
    if in_place:
        target.write_bytes(copy.read_bytes())
    else:
        os.replace(copy, target)
    os.utime(target, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)
    after = load(root)
    assert len(decodes) == 2  # not read from the entry of the old file
    index = [path for path, _ in folders.scan_folder(root / "train")[1]].index(target)
    assert before.images[index, 0].float().mean() > 200 and after.images[index, 2].float().mean() > 200
    assert after.images[index, 0].max() < 50  # the new blue pixels, not the old red ones


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path):
    path.write_bytes(b"not a safetensors file at all")


def flip_a_pixel(path: Path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a pixel: the labels are 48 bytes, the images 1,152, and one of them ends the file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, garbage, flip_a_pixel, lambda p: p.write_bytes(b"")],
                         ids=["truncated", "garbage", "a flipped pixel", "empty"])
def test_a_damaged_entry_is_ignored_and_rewritten(tmp_path, cache_dir, decodes, monkeypatch, damage):
    root = image_folder(tmp_path / "data")
    first = load(root)
    [entry] = cache_dir.iterdir()
    damage(entry)
    assert_same(load(root), first)
    assert decodes == [6, 6]
    monkeypatch.setattr(folders, "decode_files", refuse_to_decode)
    assert_same(load(root), first)  # the rewritten entry is whole


def test_two_runs_decoding_at_once_both_succeed(tmp_path, cache_dir, monkeypatch):
    root = image_folder(tmp_path / "data")
    both_decoding = threading.Barrier(2, timeout=60)
    real = folders.decode_files

    def decode_together(folder, workers):
        both_decoding.wait()  # both have missed the cache; both will write the entry
        return real(folder, workers)

    monkeypatch.setattr(folders, "decode_files", decode_together)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: load(root), range(2))
    assert_same(first, second)
    assert [name.endswith(".safetensors") for name in entries(cache_dir)] == [True]  # no temporary file left
    monkeypatch.setattr(folders, "decode_files", refuse_to_decode)
    assert_same(load(root), first)


@pytest.mark.parametrize("value", ["off", "OFF", ""])
def test_off_writes_nothing(tmp_path, monkeypatch, decodes, value):
    root = image_folder(tmp_path / "data")
    monkeypatch.setenv("ALLCONV_CACHE_DIR", value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_folder() is None
    assert_same(load(root), load(root))
    assert decodes == [6, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_default_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("ALLCONV_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_folder() == tmp_path / "xdg" / "allconv" / "images"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not absolute: the XDG spec says ignore it
    assert cache.cache_folder() == tmp_path / "home" / ".cache" / "allconv" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_folder() == tmp_path / "home" / ".cache" / "allconv" / "images"


def read_only(folder: Path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes to any folder")
    folder.mkdir()
    folder.chmod(0o500)


def under_a_file(folder: Path):
    folder.parent.mkdir()
    (folder.parent / "afile").write_text("x")  # the cache folder cannot be made, even by root


@pytest.mark.parametrize("unwritable", [read_only, under_a_file], ids=["read-only", "under a file"])
def test_an_unwritable_cache_folder_still_loads(tmp_path, monkeypatch, decodes, capsys, unwritable):
    root = image_folder(tmp_path / "data")
    folder = tmp_path / "cache" / ("afile" if unwritable is under_a_file else "images")
    monkeypatch.setenv("ALLCONV_CACHE_DIR", str(folder))
    unwritable(folder)
    try:
        assert_same(load(root), load(root))
    finally:
        if folder.is_dir():
            folder.chmod(0o700)
    assert decodes == [6, 6] and sorted(tmp_path.glob("cache/**/*.safetensors")) == []
    warning = capsys.readouterr().err.strip().splitlines()  # once, not on every load
    assert len(warning) == 1 and warning[0].startswith("Warning: ") and "ALLCONV_CACHE_DIR" in warning[0], warning


def test_a_streamed_folder_is_not_cached(tmp_path, cache_dir, monkeypatch):
    root = image_folder(tmp_path / "data")
    monkeypatch.setattr(folders, "IN_MEMORY_LIMIT", 0)
    assert isinstance(load(root), splits.FolderData)
    assert entries(cache_dir) == []


def test_a_miss_decodes_with_the_threads_torch_computes_with(tmp_path, cache_dir, monkeypatch):
    root = image_folder(tmp_path / "data")
    threads = []

    class Recording(ThreadPoolExecutor):
        def __init__(self, max_workers):
            threads.append(max_workers)
            super().__init__(max_workers)

    monkeypatch.setattr(folders, "ThreadPoolExecutor", Recording)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 5)  # one per free core, or --threads
    load(root)
    assert threads == [5]
