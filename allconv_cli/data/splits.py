"""A split of a data set: in memory (``ImageData``) or on disk (``FolderData``), and the
subsets a run takes of one (a held-out validation split, a limit)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


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
