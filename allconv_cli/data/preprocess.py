"""Input preprocessing: per-channel standardization, or the paper's GCN + ZCA whitening.

Both map float images in [0, 1], shape (B, C, H, W), to the model's input, and both are
saved with a checkpoint (settings in its metadata, tensors under ``preprocess.*``), so that
eval, visualize and export apply exactly what training applied.
"""

from __future__ import annotations

import torch
from torch import nn

from allconv_cli.choices import PREPROCESSING

KINDS = PREPROCESSING
ZCA_MAX_DIMS = 64 * 64 * 3  # a (D, D) float32 matrix: 151 MB at this size


class Standardize(nn.Module):
    """(x - mean) / std per channel."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def to_meta(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"kind": "standardize", "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist()}, {}


class GCNZCA(nn.Module):
    """Global contrast normalization, then ZCA whitening (the Maxout paper's, as in Section 3.2).

    GCN: each image minus its own mean, scaled to L2 norm ``scale`` (pylearn2's
    ``global_contrast_normalize(scale=55, use_std=False)``). ZCA: minus the training mean, times
    ``W = V diag(1 / sqrt(eig + bias)) V^T`` of the training covariance (pylearn2's ``ZCA(filter_bias=0.1)``).
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, scale: float = 55.0, bias: float = 0.1):
        super().__init__()
        self.scale, self.bias = float(scale), float(bias)
        self.register_buffer("zca_mean", mean.float())  # (D,)
        self.register_buffer("zca_matrix", matrix.float())  # (D, D), symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = gcn(x.flatten(1).float(), self.scale)
        return ((flat - self.zca_mean) @ self.zca_matrix).view_as(x)

    def to_meta(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return ({"kind": "zca", "gcn_scale": self.scale, "zca_bias": self.bias},
                {"zca_mean": self.zca_mean, "zca_matrix": self.zca_matrix})


def gcn(flat: torch.Tensor, scale: float = 55.0, min_divisor: float = 1e-8) -> torch.Tensor:
    """(N, D) rows minus their mean, scaled to L2 norm ``scale``."""
    flat = flat - flat.mean(dim=1, keepdim=True)
    norm = flat.norm(dim=1, keepdim=True) / scale
    return flat / norm.clamp_min(min_divisor)


def fit_zca(images: torch.Tensor, scale: float = 55.0, bias: float = 0.1, chunk: int = 4096) -> GCNZCA:
    """Fit GCN + ZCA on uint8 or [0, 1] training images (N, C, H, W), in float64 for stability."""
    dims = images[0].numel()
    if dims > ZCA_MAX_DIMS:
        raise ValueError(f"ZCA whitening of {tuple(images.shape[1:])} inputs needs a {dims}x{dims} "
                         "matrix; use --preprocess standardize for inputs over 64x64")
    n = images.shape[0]
    total = torch.zeros(dims, dtype=torch.float64)
    gram = torch.zeros(dims, dims, dtype=torch.float64)
    for start in range(0, n, chunk):  # chunks bound memory: 4096 x 3072 float64 is 100 MB
        flat = gcn(_unit(images[start:start + chunk]).flatten(1).double(), scale)
        total += flat.sum(0)
        gram += flat.T @ flat
    mean = total / n
    cov = gram / n - torch.outer(mean, mean)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    matrix = (eigvecs * (eigvals.clamp_min(0) + bias).rsqrt()) @ eigvecs.T
    return GCNZCA(mean, matrix, scale, bias)


def fit(kind: str, images: torch.Tensor, **zca_kwargs) -> nn.Module:
    """Fit ``kind`` (standardize | zca) on the training images (N, C, H, W)."""
    if kind == "zca":
        return fit_zca(images, **zca_kwargs)
    if kind != "standardize":
        raise ValueError(f"unknown preprocessing {kind!r}: use one of {', '.join(KINDS)}")
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, images.shape[0], 4096):
        batch = _unit(images[start:start + 4096]).double()
        total += batch.sum((0, 2, 3))
        squares += batch.square().sum((0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return Standardize(mean, std)


def from_meta(meta: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the module that ``to_meta`` described (as stored in a checkpoint)."""
    kind = meta.get("kind")
    if kind == "standardize":
        return Standardize(meta["mean"], meta["std"])
    if kind == "zca":
        return GCNZCA(tensors["zca_mean"], tensors["zca_matrix"], meta["gcn_scale"], meta["zca_bias"])
    raise ValueError(f"unknown preprocessing {kind!r} in checkpoint metadata; use one of {', '.join(KINDS)}")


def _unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] -> float [0, 1]."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()
