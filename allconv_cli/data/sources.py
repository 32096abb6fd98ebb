"""The data sets a run can read (``--dataset``): one entry each, carrying everything that choice
needs. A new source is one entry here and its loader: the option's choices and help, the checks
of a --data-dir, the run's data (``datasets.run_data``), ``eval``, ``visualize --dataset`` and
``faithfulness`` follow from the entry.

Torch-free, so that ``allconv --help`` reads it: the loader is named as ``module:function`` and
imported when a split is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DataSource:
    """One data set.

    ``load``: "module:function" (or the function) that takes (name, split, data_dir, input_size,
    workers, fit) -> a ``splits.Split`` of uint8 images at ``input_size`` (C, H, W), ``split``
    being train or test and ``fit`` the model's (interpolation, crop_pct). ``help``: what it is
    (the help of --dataset). ``layout``: what its --data-dir holds, for the messages that ask for
    one. ``splits``: what its train and test splits are. ``classes``: how many it has (None: as
    many as its folder holds). ``data_dir``: "required", "optional" (a default folder) or "none"
    (inside allconv: a --data-dir is refused). ``check``: "module:function" that checks a folder's
    layout, without reading an image, before a run folder is made for it (None: the loader checks)."""

    load: str | Callable
    help: str
    layout: str
    splits: str
    classes: int | None
    data_dir: str = "required"
    check: str | Callable | None = None

    def loader(self) -> Callable:
        return _function(self.load)

    def checker(self) -> Callable | None:
        return None if self.check is None else _function(self.check)

    def __str__(self) -> str:  # the option's help lists each choice with this text
        return self.help


def _function(named: str | Callable) -> Callable:
    if callable(named):
        return named
    module, _, function = named.partition(":")
    return getattr(importlib.import_module(module), function)


_CIFAR_LAYOUT = "torchvision's {folder}/ pickles, downloaded there if missing (default: data/)"

DATA_SOURCES: dict[str, DataSource] = {
    "sample": DataSource(
        "allconv_cli.data.sample:load_sample", "bundled: 4,000 + 1,000 CIFAR-10 images, offline",
        "inside allconv", "train: 4,000 of CIFAR-10's training images; test: 1,000 of its test images", 10,
        data_dir="none"),
    "cifar10": DataSource(
        "allconv_cli.data.cifar:load_cifar", "CIFAR-10 in torchvision's layout",
        _CIFAR_LAYOUT.format(folder="cifar-10-batches-py"), "train: 50,000 images; test: 10,000", 10,
        data_dir="optional"),
    "cifar100": DataSource(
        "allconv_cli.data.cifar:load_cifar", "CIFAR-100 in torchvision's layout",
        _CIFAR_LAYOUT.format(folder="cifar-100-python"), "train: 50,000 images; test: 10,000", 100,
        data_dir="optional"),
    "imagefolder": DataSource(
        "allconv_cli.data.folders:load_folder", "a folder of image files, one sub-folder per class",
        "train/ and val/ or test/, one sub-folder per class", "train: train/; test: val/, else test/", None,
        check="allconv_cli.data.folders:check_folder"),
}
