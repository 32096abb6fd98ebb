"""Input preprocessing: per-channel standardization, or the paper's GCN + ZCA whitening.

Both map float images in [0, 1], shape (B, C, H, W), to the model's input, and both are
saved with a checkpoint (settings in its metadata, tensors under ``preprocess.*``), so that
eval, visualize and export apply exactly what training applied. A run folder keeps less for
its resume (``kept``, ``restore``): a ZCA whitening is fitted again from the training images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from allconv_cli.choices import PREPROCESSING

KINDS = PREPROCESSING
ZCA_MAX_DIMS = 64 * 64 * 3  # a (D, D) float32 matrix: 151 MB at this size
# How far a refit of the same images may stray from the kept mean and diagonal, relative and in
# input units: another thread count or maths library rounds otherwise (1 against 2 threads of
# MKL: 9e-10 apart on CIFAR-10's sample, entries up to 2.8); a changed fit is far beyond it.
REFIT_RTOL, REFIT_ATOL = 1e-5, 1e-6


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

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, scale: float = 55.0, bias: float = 0.1,
                 data_digest: str | None = None):
        super().__init__()
        self.scale, self.bias = float(scale), float(bias)
        self.register_buffer("zca_mean", mean.float())  # (D,)
        self.register_buffer("zca_matrix", matrix.float())  # (D, D), symmetric
        self.data_digest = data_digest  # sha256 of the images it was fitted on; None when read from a file

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
    return GCNZCA(mean, matrix, scale, bias, digest(images))


def digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes, in order (0.23 s for CIFAR-10's 150 MB of
    training images on a busy 2-core AMD EPYC)."""
    hashed = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        hashed.update(f"{tuple(tensor.shape)} {tensor.dtype}\n".encode())
        hashed.update(tensor.view(-1).view(torch.uint8).numpy())
    return hashed.hexdigest()


def kept(module: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """What a run folder keeps of its fitted preprocessing for a resume -> (description, tensors).
    A ZCA whitening fitted on the run's training images keeps, instead of its 36 MiB matrix, the
    sha256 of those images and of the fit (``refit`` in the description) and 24 KB to compare a
    refit with (the mean and the matrix's diagonal): ``restore`` fits it again. Anything else
    (one read from --init weights too) keeps what ``to_meta`` gives."""
    meta, tensors = module.to_meta()
    if not isinstance(module, GCNZCA) or module.data_digest is None:
        return meta, tensors
    refit = {"data": module.data_digest, "fit": digest(module.zca_mean, module.zca_matrix)}
    return {**meta, "refit": refit}, {"zca_mean": module.zca_mean, "zca_diagonal": module.zca_matrix.diagonal()}


def restore(meta: dict, tensors: dict[str, torch.Tensor], images: Callable[[], torch.Tensor]) -> nn.Module:
    """The preprocessing that ``kept`` gave: rebuilt from its tensors, or fitted again on
    ``images()``, the run's training images. Those must be the images it was first fitted on, and
    the refit its fit: bit for bit on the same machine, within REFIT_RTOL elsewhere."""
    refit = meta.get("refit")
    if refit is None:
        return from_meta(meta, tensors)
    pixels = images()
    found = digest(pixels)  # before the fit, whose 3072 x 3072 eigh took a minute on two busy cores
    if found != refit["data"]:
        raise ValueError(f"the training images differ from those this run's ZCA whitening was fitted on (sha256 "
                         f"{found[:12]}... here, {refit['data'][:12]}... in the run): resume with the data it began "
                         "with, or start a new run")
    fitted = fit_zca(pixels, meta["gcn_scale"], meta["zca_bias"])
    if digest(fitted.zca_mean, fitted.zca_matrix) != refit["fit"] and not all(
            torch.allclose(new, old.to(new), REFIT_RTOL, REFIT_ATOL) for new, old in (
                (fitted.zca_mean, tensors["zca_mean"]), (fitted.zca_matrix.diagonal(), tensors["zca_diagonal"]))):
        raise ValueError("the ZCA whitening fitted again on this run's training images differs from its first fit "
                         "beyond rounding: resume with the allconv version that began the run, or start a new run")
    return fitted


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
