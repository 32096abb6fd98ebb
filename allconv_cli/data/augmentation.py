"""The paper's augmentation (flips, translations with reflected borders, crops), a batch at a time
on the training device, as one uint8 gather of source pixels."""

from __future__ import annotations

import functools

import torch

from allconv_cli.choices import AUGMENTATIONS


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
