"""Data sets as uint8 image batches: CIFAR-10/100 (torchvision's layout), any ImageFolder, and
the bundled CIFAR-10 sample.

Every source yields ``(images, labels)`` with images uint8 (B, C, H, W) at the model's input
size and labels int64 (B,). Augmentation and normalization happen afterwards, a batch at a
time on the training device (``augmentation``, and ``preprocess`` for normalization), so one code
path serves the CPU, the GPU and every data set. CIFAR-sized splits are held in memory as one
uint8 tensor (on the GPU when training there); an ImageFolder's is decoded on its first load
only, then read back from disk (``data.cache``). Larger ImageFolders stream through DataLoader
workers that only decode and resize.

The sources live one to a module: ``cifar`` (torchvision's layout), ``folders`` (ImageFolders),
``sample`` (the bundled sample), over ``splits`` (a split in memory or on disk), ``batches`` and
``augmentation``; this module picks the source by name.
"""

from __future__ import annotations

from pathlib import Path

from allconv_cli.choices import DATASETS
from allconv_cli.data.batches import Batches
from allconv_cli.data.cifar import load_cifar
from allconv_cli.data.folders import load_folder
from allconv_cli.data.layout import CIFAR, layout_hint
from allconv_cli.data.sample import load_sample
from allconv_cli.data.splits import Split
from allconv_cli.util import did_you_mean


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
        return load_sample(split, tuple(input_size), tuple(fit))
    if name in CIFAR:
        return load_cifar(name, split, data_dir, input_size)
    if data_dir is None:
        raise ValueError("--dataset imagefolder needs --data-dir DIR (with train/ and val/ or "
                         "test/, one sub-folder per class)")
    return load_folder(Path(data_dir), split, input_size, workers, tuple(fit))



def check_source(name: str, data_dir: str | Path | None):
    """Refuse a data set name that is not one, and a --data-dir that the data set would ignore."""
    if name not in DATASETS:

        raise ValueError(f"unknown data set {name!r}{did_you_mean(name, DATASETS)}; use one of {', '.join(DATASETS)}")
    if name == "sample" and data_dir is not None:
        raise ValueError(f"the bundled sample data set is inside allconv and reads no --data-dir: drop "
                         f"--data-dir {data_dir}, or give the --dataset of that folder{layout_hint(Path(data_dir))}")



def iter_batches(name: str, data_dir: str | Path | None, split: str,
                 input_size: tuple[int, int, int], batch_size: int, workers: int = 2):
    """Every image of a split once, in order: ``(uint8 (B, C, H, W), int64 (B,))`` batches."""
    data = load_split(name, split, data_dir, input_size, workers)
    yield from Batches(data, batch_size, shuffle=False, workers=workers).epoch(0)

