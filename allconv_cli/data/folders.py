"""ImageFolder splits (``ROOT/train/<class>/*``, ``ROOT/val/`` or ``ROOT/test/``): checked without
reading an image, decoded once into memory (through ``data.cache``), or streamed by a Dataset
when too large to hold."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from allconv_cli.data import cache
from allconv_cli.data.images import fit_image, open_image
from allconv_cli.data.layout import layout_hint, some
from allconv_cli.data.splits import FolderData, ImageData, Split


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IN_MEMORY_LIMIT = 4 * 2**30  # bytes of uint8 pixels; larger ImageFolders stream from disk



def class_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))



def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()



def _check_split(folder: Path) -> list[str]:
    """An ImageFolder split's class names; raises unless there are at least two class folders and
    each holds an image (found without listing the whole folder)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: an ImageFolder needs {folder.parent}/train/ and "
                                f"{folder.parent}/val/ or test/, one sub-folder per class"
                                f"{layout_hint(folder.parent, 'imagefolder')}")
    classes = class_names(folder)
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders: put each class's images in {folder}/<class>/")
    empty = [cls for cls in classes if not any(_is_image(path) for path in (folder / cls).rglob("*"))]
    if empty:
        raise ValueError(f"class folder{'s' if len(empty) > 1 else ''} {some(empty)} in {folder} "
                         f"{'have' if len(empty) > 1 else 'has'} no images ({', '.join(IMAGE_EXTENSIONS)}): "
                         "add images or remove the folder, or every label after it shifts")
    if len(classes) < 2:
        raise ValueError(f"{folder} has one class folder ({classes[0]}/): a classifier needs at least two")
    return classes



def scan_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """A checked ImageFolder split -> (class names, (image file, label) pairs)."""
    classes = _check_split(folder)
    return classes, [(path, label) for label, cls in enumerate(classes)
                     for path in sorted((folder / cls).rglob("*")) if _is_image(path)]



def split_folders(root: Path, split: str) -> tuple[str, str]:
    """(the folder of ``split``, the other split's folder): train, and val (else test)."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} {'is a file' if root.exists() else 'does not exist'}: give "
                                "--data-dir DIR with train/ and val/ or test/ inside, one sub-folder per class")
    evaluated = next((n for n in ("val", "test") if (root / n).is_dir()), "val")
    return (evaluated, "train") if split == "test" else ("train", evaluated)



def _same_classes(root: Path, name: str, classes: list[str], other: str):
    if (root / other).is_dir() and class_names(root / other) != classes:
        mine, theirs = set(classes), set(class_names(root / other))
        only = {split: some(sorted(names)) or "none" for split, names in ((name, mine - theirs), (other, theirs - mine))}
        raise ValueError(f"{root / name} and {root / other} have different class folders (only in {name}: "
                         f"{only[name]}; only in {other}: {only[other]}): a label would mean another class "
                         "in each split; give both splits the same class folders")



def check_folder(root: str | Path):
    """Both splits of an ImageFolder, before a run starts, without reading an image."""
    root = Path(root)
    train, evaluated = split_folders(root, "train")
    classes = _check_split(root / train)
    _check_split(root / evaluated)
    _same_classes(root, train, classes, evaluated)



def load_folder(dataset: str, split: str, data_dir, input_size, workers: int, fit: tuple[str, float]) -> Split:
    """A loader of ``sources.DATA_SOURCES``: an ImageFolder's split."""
    root = Path(data_dir)
    name, other = split_folders(root, split)
    classes, files = scan_folder(root / name)
    _same_classes(root, name, classes, other)
    folder = FolderData([p for p, _ in files], torch.tensor([lab for _, lab in files]), classes,
                        tuple(input_size), fit)
    if len(folder) * math.prod(input_size) > IN_MEMORY_LIMIT:
        return folder
    images = cache.load_or_decode(root / name, folder.files, folder.labels, classes, folder.input_size, fit,
                                  lambda: decode_files(folder, workers))
    return ImageData(images, folder.labels, classes)



def decode_files(folder: FolderData, workers: int) -> torch.Tensor:
    """Every file of ``folder`` decoded and fitted, uint8 (N, C, H, W). Threads, not processes:
    PIL decodes without the GIL, and a bad file raises right here. As many threads as torch
    computes with (one per free core, or --threads), not just ``workers``: nothing else of the
    run goes on while a split loads."""
    with ThreadPoolExecutor(max(1, workers, torch.get_num_threads())) as pool:
        images = list(pool.map(lambda path: fit_file(open_image(path, folder.input_size[0]), folder.input_size, folder.fit),
                               folder.files))
    return torch.stack(images)



class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, data: FolderData):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img = open_image(self.data.files[i], channels=self.data.input_size[0])
        return fit_file(img, self.data.input_size, self.data.fit), self.data.labels[i]



def fit_file(img: Image.Image, input_size, fit: tuple[str, float]) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W) at ``input_size`` by the shared ``images.fit_image`` with the
    model's (interpolation, crop_pct); a CIFAR-sized image for a CIFAR net (crop_pct 1.0) is
    untouched."""

    return fit_image(img, input_size, *fit)
