"""Data sets as uint8 image batches: CIFAR-10/100 (torchvision's layout), any ImageFolder, and
the bundled CIFAR-10 sample.

Every source yields ``(images, labels)`` with images uint8 (B, C, H, W) at the model's input
size and labels int64 (B,). Augmentation and normalization happen afterwards, a batch at a
time on the training device (``augmentation``, and ``preprocess`` for normalization), so one code
path serves the CPU, the GPU and every data set. CIFAR-sized splits are held in memory as one
uint8 tensor (on the GPU when training there); an ImageFolder's is decoded on its first load
only, then read back from disk (``data.cache``). Larger ImageFolders stream through DataLoader
workers that only decode and resize.

The sources are the entries of ``sources.DATA_SOURCES``, their loaders one to a module: ``cifar``
(torchvision's layout), ``folders`` (ImageFolders), ``sample`` (the bundled sample), over
``splits`` (a split in memory or on disk), ``batches`` and ``augmentation``; this module loads a
split of a source by name, and hands a run its data (``run_data``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from allconv_cli.data import preprocess as preprocessing
from allconv_cli.data import splits
from allconv_cli.data.batches import Batches
from allconv_cli.data.layout import layout_hint
from allconv_cli.data.sources import DATA_SOURCES, DataSource
from allconv_cli.data.splits import Split
from allconv_cli.util import did_you_mean


def load_split(name: str, split: str, data_dir: str | Path | None = None,
               input_size: tuple[int, int, int] = (3, 32, 32), workers: int = 2,
               fit: tuple[str, float] = ("bilinear", 1.0)) -> Split:
    """Load ``split`` (train | test) of data set ``name`` (an entry of ``sources.DATA_SOURCES``) at
    ``input_size`` (C, H, W); image files are fitted to it with the model's ``fit`` =
    (interpolation, crop_pct), as ``images.fit_options`` reads them from its registered configuration.

    Raises ValueError / FileNotFoundError with the fix for unknown names, missing folders,
    empty folders and unreadable images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use train or test")
    source = check_source(name, data_dir)
    if data_dir is None and source.data_dir == "required":
        raise ValueError(f"--dataset {name} needs --data-dir DIR ({source.layout})")
    return source.loader()(name, split, data_dir, tuple(input_size), workers, tuple(fit))


def check_source(name: str, data_dir: str | Path | None) -> DataSource:
    """The data set of that name; refuse a name that is not one, and a --data-dir that the data
    set would ignore."""
    if name not in DATA_SOURCES:
        raise ValueError(f"unknown data set {name!r}{did_you_mean(name, DATA_SOURCES)}; "
                         f"use one of {', '.join(DATA_SOURCES)}")
    source = DATA_SOURCES[name]
    if source.data_dir == "none" and data_dir is not None:
        raise ValueError(f"the {name} data set is {source.layout} and reads no --data-dir: drop "
                         f"--data-dir {data_dir}, or give the --dataset of that folder{layout_hint(Path(data_dir))}")
    return source


@dataclass
class RunData:
    """What a run trains and is scored on: its splits (``validation`` held out of train, else
    None) and the preprocessing fitted to its training images, or restored."""

    train: Split
    test: Split
    validation: Split | None
    preprocess: nn.Module
    fit_images: torch.Tensor | None  # uint8 (N, C, H, W) the preprocessing was fitted on, shuffled; None if restored

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def run_data(settings, input_size: tuple[int, int, int], fit: tuple[str, float],
             preprocess_state: tuple[dict, dict] | None = None) -> RunData:
    """A run's data from its settings (dataset, data_dir, workers, seed, train_limit, test_limit,
    val_fraction, shuffle_labels, preprocess): both splits at ``input_size`` with the model's
    ``fit``, limited, a validation share held out of train, and the preprocessing fitted to the
    training images, or restored from ``preprocess_state`` (a resumed run's, or --init weights')."""
    def split(name: str, count: int | None) -> Split:
        loaded = load_split(settings.dataset, name, settings.data_dir, input_size, settings.workers, fit)
        return splits.limit(loaded, count, settings.seed)

    train, test = split("train", settings.train_limit), split("test", settings.test_limit)
    if len(test.classes) != len(train.classes):
        raise ValueError(f"the train split has {len(train.classes)} classes and the test split "
                         f"{len(test.classes)}: give both the same class folders")
    validation = None
    if settings.val_fraction > 0:
        train, validation = splits.held_out(train, settings.val_fraction, settings.seed)
    if settings.shuffle_labels:  # once, fixed by the seed: the labels no longer say what the image shows
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed))
        train = dataclasses.replace(train, labels=train.labels[order])
    if preprocess_state is not None:  # resumed (ZCA fitted again, checked), or --init weights'
        prep = preprocessing.restore(*preprocess_state, lambda: _fit_images(train, settings.seed))
        return RunData(train, test, validation, prep, None)
    images = _fit_images(train, settings.seed)
    shuffled = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed))]
    return RunData(train, test, validation, preprocessing.fit(settings.preprocess, images), shuffled)


def _fit_images(split: Split, seed: int, most: int = 10_000) -> torch.Tensor:
    """All training images in memory; a fixed random 10,000 of a streamed folder."""
    if isinstance(split, splits.ImageData):
        return split.images
    sample = splits.limit(split, most, seed)
    return torch.cat([x for x, _ in Batches(sample, 256, shuffle=False).epoch(0)])


def iter_batches(name: str, data_dir: str | Path | None, split: str,
                 input_size: tuple[int, int, int], batch_size: int, workers: int = 2):
    """Every image of a split once, in order: ``(uint8 (B, C, H, W), int64 (B,))`` batches."""
    data = load_split(name, split, data_dir, input_size, workers)
    yield from Batches(data, batch_size, shuffle=False, workers=workers).epoch(0)

