"""CIFAR-10/100 in torchvision's layout: its python batches read without unpickling anything but
arrays, downloaded into --data-dir where missing (a failure removes what it made)."""

from __future__ import annotations

import contextlib
import pickle
import shutil
import socket
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import utils as torchvision_utils

from allconv_cli.data.layout import CIFAR, layout_hint
from allconv_cli.data.splits import ImageData


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles of dicts, lists and numpy arrays: allow exactly those."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")



def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a CIFAR batch file ({err}); delete it and download again") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR batch file (no dict inside)")
    return batch



def load_cifar(name: str, split: str, data_dir, input_size, workers: int = 0, fit: tuple | None = None) -> ImageData:
    """A loader of ``sources.DATA_SOURCES``: arrays in memory, no decoding workers and no file to fit."""
    folder, url, md5, train_files, test_files, (meta_file, meta_key), label_key = CIFAR[name]
    root = Path(data_dir) if data_dir is not None else Path("data")
    base = root / folder
    layout = f"{root}/{folder}/{{{', '.join(train_files + test_files)}, {meta_file}}}"
    if not base.is_dir():
        if any((root / n).is_dir() for n in ("train", "val", "test")):  # an ImageFolder: do not download into it
            raise FileNotFoundError(f"{root} has no {folder}/ (torchvision's {name} pickles, {layout})"
                                    f"{layout_hint(root)}")
        _download(name, url, md5, root, base)
    for file in [*(train_files if split == "train" else test_files), meta_file]:
        if not (base / file).is_file():
            raise FileNotFoundError(f"{base / file} is missing: {name} expects torchvision's layout {layout}; "
                                    f"delete {base} to download it again")
    classes = _read_batch(base / meta_file).get(meta_key)
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{base / meta_file} has no list of class names under {meta_key!r}: delete {base} "
                         "and download it again")
    images, labels = [], []
    for file in train_files if split == "train" else test_files:
        pixels, batch_labels = _cifar_arrays(base / file, label_key, len(classes))
        images.append(pixels)
        labels.append(batch_labels)
    data = ImageData(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), classes)
    if tuple(input_size) != (3, 32, 32):
        data.images = _resize_batch(data.images, input_size)
    return data



def _cifar_arrays(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> uint8 images (N, 3, 32, 32) and int64 labels (N,) in [0, classes)."""
    batch = _read_batch(path)
    try:
        pixels = np.asarray(batch["data"])
        labels = np.asarray(batch[label_key])
        well_formed = (pixels.dtype == np.uint8 and pixels.ndim == 2 and pixels.shape[1] == 3 * 32 * 32
                       and labels.shape == (len(pixels),) and labels.dtype.kind in "iu")
    except (KeyError, ValueError, TypeError):  # a missing key, or ragged lists
        well_formed = False
    if not well_formed:
        raise ValueError(f"{path} is not a CIFAR batch file (it needs uint8 'data' (N, 3072) and N integer "
                         f"{label_key!r}); delete it and download again")
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"{path} has labels outside 0..{num_classes - 1}; delete it and download again")
    return pixels.reshape(-1, 3, 32, 32), labels.astype(np.int64)



def _download(name, url, md5, root: Path, base: Path):
    """Download and unpack into ``root``; a failure removes every file and folder it made."""

    made = root
    while not made.parent.exists() and made.parent != made:  # the first folder the download creates
        made = made.parent
    existed = made.exists()
    before = set(root.iterdir()) if root.is_dir() else set()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # seconds: fail fast where there is no network
    try:
        torchvision_utils.download_and_extract_archive(url, str(root), md5=md5, remove_finished=True)
    except BaseException as err:
        _remove_new(root, before, made if not existed else None)
        if isinstance(err, urllib.error.URLError | OSError | RuntimeError):
            raise FileNotFoundError(f"{name} is not in {base} and could not be downloaded ({err}); put "
                                    f"torchvision's {base.name}/ folder under --data-dir DIR") from None
        raise
    finally:
        socket.setdefaulttimeout(previous)



def _remove_new(root: Path, before: set[Path], made: Path | None):
    """Delete what appeared in ``root`` since ``before``, then ``made`` (and the folders down to
    ``root``) if the download created them and they are empty now."""
    if root.is_dir():
        for path in set(root.iterdir()) - before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    if made is not None:
        folder = root
        while True:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                folder.rmdir()
            if folder == made or folder.parent == folder:
                break
            folder = folder.parent



def _resize_batch(images: torch.Tensor, input_size) -> torch.Tensor:
    channels, height, width = input_size
    if channels != images.shape[1]:
        raise ValueError(f"this data set has {images.shape[1]} channels; the model wants {channels}")
    out = F.interpolate(images.float(), size=(height, width), mode="bilinear", antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)
