"""What a data folder holds: torchvision's CIFAR folders, and hints that say which
``--dataset`` a folder's layout is. A leaf: the CIFAR loader, the ImageFolder checks and the
data set names all read it."""

from __future__ import annotations

from pathlib import Path


# torchvision's CIFAR archives: (folder, url, md5, train files, test files, meta file, label key)
CIFAR = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", [f"data_batch_{i}" for i in range(1, 6)],
                ["test_batch"], ("batches.meta", "label_names"), "labels"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", ["train"], ["test"],
                 ("meta", "fine_label_names"), "fine_labels"),
}



def layout_hint(root: Path, using: str | None = None) -> str:
    """' (D holds ...: --dataset X)': the data set whose layout ``root`` has, or what is in it;
    nothing more where that is the data set ``using`` already."""
    if not root.is_dir():
        return f" ({root} does not exist)"
    for name, (folder, *_) in CIFAR.items():
        if (root / folder).is_dir():
            return f" ({root} holds {folder}/: --dataset {name})"
    splits = [n for n in ("train", "val", "test") if (root / n).is_dir()]
    if splits:
        return "" if using == "imagefolder" else (f" ({root} holds {'/, '.join(splits)}/, an ImageFolder layout: "
                                                  "--dataset imagefolder)")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith("."))
    if not entries:
        return f" ({root} is empty)"
    return f" ({root} holds {some(entries)}, neither torchvision's CIFAR folder nor train/ and val/ or test/)"



def some(names, most: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
