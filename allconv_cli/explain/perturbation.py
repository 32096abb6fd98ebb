"""Faithfulness metrics: does a map point at what the model uses? For any model and any map
(``faithfulness`` runs them over data sets and the saliency methods).

Each image's probability of the explained class (softmax of the logits) is measured as its
pixels are removed, or put back, in the order of a map, most relevant first:

- ``deletion`` (Petsiuk et al., 2018, the RISE paper; pixel flipping, Bach et al., 2015): the
  most relevant pixels are replaced by the baseline's, a tenth (``steps``) more at each step;
  the score is the area under the probability curve over the fraction removed, 0 to 1. Lower is
  more faithful: the class vanishes when what the map points at is gone.
- ``insertion``: the baseline with the most relevant pixels put back from the image. Higher is
  more faithful.
- ``road_morf`` and ``road_lerf`` (ROAD, remove and debias; Rong et al., 2022): 10 % to 90 % of
  the pixels removed, most (MoRF) or least (LeRF) relevant first, and filled in by noisy linear
  imputation, so that the shape of the hole tells the model nothing. The score is the mean
  probability over the nine levels. MoRF: lower is more faithful; LeRF: higher.

Pixels are removed in the model's input space (after preprocessing), where the maps are
gradients: a pixel is one (y, x) position and its C values are replaced together. A map
(B, C, H, W) ranks the positions by ``relevance``: |map| summed over channels, so a pixel whose
colour channels pull in opposite directions still counts by its total magnitude; ties are broken
in a seeded random order (a map that is zero in a region does not fall back to raster order).

Baselines (``BASELINES``), the values a removed pixel takes in deletion and the start of
insertion: ``blur``, the input blurred by a Gaussian of sigma = width / 16 px (2 px at 32 x 32),
as RISE starts insertion from a blurred image; ``zero``, 0 in the input space, which for a
standardized or whitened input is the training data's mean colour.

Model-free reference maps (``methods.MODEL_FREE``): ``random`` (uniform noise, seeded) and ``sobel``
(the Sobel gradient magnitude of the image in [0, 1], summed over colour channels): a method
that does not beat ``sobel`` ranks pixels no better than "where the edges are".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli.device import autocast
from allconv_cli.explain.methods import MODEL_FREE
from allconv_cli.explain.targets import eval_mode
from allconv_cli.util import did_you_mean

__all__ = ["BASELINES", "METRICS", "ROAD_FRACTIONS", "auc", "baseline_inputs", "check_baseline", "check_steps",
           "impute", "interval", "model_free_map", "perturbation_curves", "relevance", "removal_ranks"]

METRICS = ("deletion", "insertion", "road_morf", "road_lerf")
BASELINES = ("blur", "zero")
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # shares of the pixels removed (Rong et al.)
ROAD_NOISE = 0.01  # std of the noise added to imputed values, in input units (Rong et al., pytorch-grad-cam)
BLUR_SIGMA = 1 / 16  # of the input's width: 2 px at 32 x 32, 14 px at 224 x 224
RESAMPLES = 2000  # bootstrap resamples of the images for the 95 % interval

# Noisy linear imputation: a removed pixel is the weighted mean of its 8 neighbours (edge
# neighbours 1/6, diagonal ones 1/12; Rong et al.). The kernel is ([1 2 1]^T [1 2 1] - 4 delta) / 12.
_IMPUTE_TOLERANCE = 1e-4  # relative residual of the linear system: values within ~5e-4, well below the noise
_IMPUTE_MAX_ITERATIONS = 2000  # conjugate gradient needs ~50 at 32 x 32 with 90 % removed
_MATMUL_SIZE = 64  # px: the largest side whose neighbour sums are matrix products (see _neighbour_sum)
_IMPUTE_VALUES = 2**22  # values per imputed chunk (16 MiB per fp32 tensor): few, large tensor operations


def relevance(maps: torch.Tensor) -> torch.Tensor:
    """Maps (B, C, H, W) -> each pixel's relevance (B, H, W): |map| summed over channels."""
    if maps.dim() != 4:
        raise ValueError(f"a map is (B, C, H, W), got shape {tuple(maps.shape)}")
    return maps.detach().float().abs().sum(1)


def removal_ranks(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Relevance (B, H, W) -> each pixel's rank (B, H, W): 0 for the most relevant, H * W - 1 for
    the least; equal scores in a random order drawn from ``generator``."""
    batch, height, width = scores.shape
    flat = scores.reshape(batch, -1)
    shuffle = torch.rand(flat.shape, generator=generator).argsort(1).to(flat.device)  # (B, HW)
    order = shuffle.gather(1, flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.view(batch, height, width)


def _removed_count(fraction: float, pixels: int) -> int:
    """round(fraction * pixels), halves up."""
    return math.floor(fraction * pixels + 0.5)


def check_steps(steps: int, height: int, width: int):
    """Deletion and insertion take 1 to H * W steps: each step must remove at least one more pixel."""
    if not 1 <= steps <= height * width:
        raise ValueError(f"--steps {steps}: give 1 to {height * width}, the pixels of the model's {height}x{width} "
                         "input (each step removes at least one more)")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred by a separable Gaussian of ``sigma`` px, edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1),
                 groups=channels)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1),
                    groups=channels)


def baseline_inputs(inputs: torch.Tensor, kind: str = "blur") -> torch.Tensor:
    """The values of removed pixels (deletion) and the starting image (insertion), (B, C, H, W)
    in the model's input space; see ``BASELINES``."""
    check_baseline(kind)
    if kind == "zero":
        return torch.zeros_like(inputs)
    return _gaussian_blur(inputs.float(), BLUR_SIGMA * inputs.shape[-1]).to(inputs.dtype)


def check_baseline(kind: str):
    if kind not in BASELINES:
        raise ValueError(f"unknown --baseline {kind!r}{did_you_mean(kind, BASELINES)}; choose from {', '.join(BASELINES)}")


def model_free_map(kind: str, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A reference map (B, 1, H, W) that knows nothing of the model: ``random`` (uniform, from
    ``generator``) or ``sobel`` (Sobel gradient magnitude of ``images`` in [0, 1], (B, C, H, W),
    summed over colour channels)."""
    if kind == "random":
        batch, _, height, width = images.shape
        return torch.rand(batch, 1, height, width, generator=generator).to(images.device)
    if kind != "sobel":
        raise ValueError(f"unknown model-free map {kind!r}; choose from {', '.join(MODEL_FREE)}")
    x = images.float()
    channels = x.shape[1]
    smooth = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    diff = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    kernels = torch.stack([smooth[:, None] * diff[None, :], diff[:, None] * smooth[None, :]])  # (2, 3, 3): d/dx, d/dy
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernels[:, None].repeat(channels, 1, 1, 1), groups=channels)  # (B, 2C, H, W)
    return grads.view(x.shape[0], channels, 2, *x.shape[2:]).square().sum(2).sqrt().sum(1, keepdim=True)


def _tridiagonal(size: int, like: torch.Tensor) -> torch.Tensor:
    """(size, size): 2 on the diagonal, 1 beside it; x @ it filters rows by [1 2 1], zero outside."""
    ones = torch.ones(size - 1, dtype=like.dtype, device=like.device)
    return 2 * torch.eye(size, dtype=like.dtype, device=like.device) + torch.diag(ones, 1) + torch.diag(ones, -1)


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each pixel's in-image neighbours, (B, C, H, W) (zero outside). Up to
    ``_MATMUL_SIZE`` px the kernel is two matrix products with ``_tridiagonal`` matrices (3x
    faster on the CPU than shifted slices at 32 x 32, measured); above, where a product costs
    O(size) per pixel, shifted slices."""
    height, width = x.shape[-2:]
    if max(height, width) <= _MATMUL_SIZE:
        return (_tridiagonal(height, x) @ (x @ _tridiagonal(width, x)) - 4 * x) / 12
    padded = F.pad(x, (1, 1, 1, 1))
    rows = padded[..., :, :-2] + 2 * padded[..., :, 1:-1] + padded[..., :, 2:]
    return (rows[..., :-2, :] + 2 * rows[..., 1:-1, :] + rows[..., 2:, :] - 4 * x) / 12


def impute(inputs: torch.Tensor, removed: torch.Tensor, noise: float = ROAD_NOISE,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Noisy linear imputation (Rong et al., 2022): every removed pixel of ``inputs`` (B, C, H, W)
    (``removed``: bool (B, H, W)) becomes the weighted mean of its neighbours, kept or imputed
    (one sparse linear system per image and channel, solved by conjugate gradient, all at once),
    plus Gaussian noise of std ``noise`` drawn from ``generator``. Each image keeps at least one
    pixel, else the system has no solution."""
    if removed.flatten(1).all(1).any():
        raise ValueError("impute needs at least one kept pixel per image")
    x = inputs.float()
    hole = removed[:, None].to(x.dtype)  # (B, 1, H, W): 1 where imputed
    weight = _neighbour_sum(torch.ones_like(hole[:1]))  # neighbour weights' total: 1 inside, less at edges
    rhs = hole * _neighbour_sum(x * (1 - hole))
    # Conjugate gradient on the hole: (weight - neighbours) u = rhs is symmetric positive
    # definite there (every hole touches a kept pixel); iterates stay zero outside the hole.
    solution, residual, direction = torch.zeros_like(x), rhs.clone(), rhs.clone()
    rr = residual.square().sum((2, 3), keepdim=True)  # (B, C, 1, 1)
    stop = _IMPUTE_TOLERANCE**2 * rr.clamp_min(1e-24)
    for _ in range(_IMPUTE_MAX_ITERATIONS):
        if bool((rr <= stop).all()):  # one host sync per iteration
            break
        product = weight * direction - hole * _neighbour_sum(direction)
        step = rr / (direction * product).sum((2, 3), keepdim=True).clamp_min(1e-30)
        solution.addcmul_(step, direction)
        residual.addcmul_(step, product, value=-1)
        rr, previous = residual.square().sum((2, 3), keepdim=True), rr
        direction = residual.addcmul(rr / previous.clamp_min(1e-30), direction)
    if noise:
        solution += noise * torch.randn(x.shape, generator=generator).to(x.device)
    return torch.where(hole.bool(), solution, x).to(inputs.dtype)


def _probabilities(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, precision: str) -> torch.Tensor:
    """Softmax probability of ``classes`` (B,) for inputs ``x`` (B, C, H, W), as fp32 (B,)."""
    with torch.no_grad(), autocast(x.device, precision):
        logits = model(x.contiguous(memory_format=torch.channels_last))
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
        raise ValueError(f"{type(model).__name__} does not return (B, classes) logits: faithfulness scores "
                         "a class probability")
    return logits.float().softmax(1).gather(1, classes[:, None]).squeeze(1)


def _deletion_insertion(model, inputs, base, ranks, classes, steps, precision, batch_size) -> torch.Tensor:
    """Probabilities (2, steps - 1, B) at the inner steps: deletion (the top k / steps of ``ranks``
    (B, 1, H, W) taken from ``base``), then insertion (only they taken from ``inputs``). The
    (step, image) rows are built and scored ``batch_size`` at a time, so small batches of images
    still make full forward passes."""
    count = len(inputs)
    pixels = ranks[0].numel()
    inner = [_removed_count(k / steps, pixels) for k in range(1, steps)]
    counts = torch.tensor(inner * 2, device=inputs.device)
    insertion = torch.tensor([False] * len(inner) + [True] * len(inner), device=inputs.device)
    out = torch.empty(len(counts) * count, device=inputs.device)
    for start in range(0, len(out), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(out)), device=inputs.device)
        p, b = rows // count, rows % count
        from_base = (ranks[b] < counts[p].view(-1, 1, 1, 1)) ^ insertion[p].view(-1, 1, 1, 1)
        out[rows] = _probabilities(model, torch.where(from_base, base[b], inputs[b]), classes[b], precision)
    return out.view(2, len(inner), count)


def _road(model, inputs, ranks, classes, noise, generator, precision, batch_size) -> torch.Tensor:
    """Probabilities (len(ROAD_FRACTIONS), 2, B) with each level's pixels imputed, most (index 0)
    or least (1) relevant first. The (level, order, image) rows are imputed in chunks of about
    ``_IMPUTE_VALUES`` values, neighbouring levels together (similar numbers of iterations)."""
    count = len(inputs)
    pixels = ranks[0].numel()
    counts = torch.tensor([min(_removed_count(f, pixels), pixels - 1) for f in ROAD_FRACTIONS], device=inputs.device)
    out = torch.empty(len(ROAD_FRACTIONS) * 2 * count, device=inputs.device)
    chunk = max(batch_size, _IMPUTE_VALUES // inputs[0].numel())
    for start in range(0, len(out), chunk):
        rows = torch.arange(start, min(start + chunk, len(out)), device=inputs.device)
        p, b = rows // count, rows % count
        removed_count = counts[p // 2].view(-1, 1, 1)
        rank = ranks[b, 0]  # (rows, H, W)
        removed = torch.where(p.view(-1, 1, 1) % 2 == 0, rank < removed_count, rank >= pixels - removed_count)
        imputed = impute(inputs[b], removed, noise, generator)
        for sub in range(0, len(rows), batch_size):
            part = slice(sub, sub + batch_size)
            out[rows[part]] = _probabilities(model, imputed[part], classes[b[part]], precision)
    return out.view(len(ROAD_FRACTIONS), 2, count)


def perturbation_curves(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor, *,
                        baseline: str | torch.Tensor = "blur", steps: int = 10, generator: torch.Generator | None = None,
                        precision: str = "fp32", batch_size: int = 250, noise: float = ROAD_NOISE) -> dict[str, torch.Tensor]:
    """The four curves (see ``METRICS``) for inputs (B, C, H, W) in the model's input space, the
    explained classes (B,) and the pixels' relevance ``scores`` (B, H, W) (``relevance`` of a
    map): class probabilities, deletion and insertion (B, steps + 1) at fractions k / steps,
    road_morf and road_lerf (B, 9) at ``ROAD_FRACTIONS``. ``baseline``: a name of
    ``BASELINES`` or a tensor like ``inputs``; ``batch_size``: images per forward pass; ``noise``:
    ROAD's, see ``impute``. Score a map of your own with this."""
    if scores.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise ValueError(f"scores {tuple(scores.shape)} do not fit inputs {tuple(inputs.shape)}: one (H, W) "
                         "relevance per image")
    check_steps(steps, *inputs.shape[2:])
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: give at least 1")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    base = baseline_inputs(inputs, baseline) if isinstance(baseline, str) else baseline
    ranks = removal_ranks(scores, generator)[:, None]  # (B, 1, H, W): 0 = most relevant
    classes = classes.to(inputs.device)
    with eval_mode(model):
        full, empty = _probabilities(model, torch.cat([inputs, base]), classes.repeat(2), precision).view(2, -1)
        inner = _deletion_insertion(model, inputs, base, ranks, classes, steps, precision, batch_size)
        road = _road(model, inputs, ranks, classes, noise, generator, precision, batch_size)
    curves = {"deletion": torch.cat([full[:, None], inner[0].T, empty[:, None]], 1),
              "insertion": torch.cat([empty[:, None], inner[1].T, full[:, None]], 1),
              "road_morf": road[:, 0].T, "road_lerf": road[:, 1].T}
    return {k: v.cpu() for k, v in curves.items()}


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves (N, K) sampled at K equally spaced fractions from 0 to 1 (trapezoids) -> (N,)."""
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * (curves.shape[1] - 1))


def interval(values: torch.Tensor, seed: int = 0, resamples: int = RESAMPLES) -> tuple[float, float, float]:
    """(mean, low, high): the mean over images and its 95 % percentile-bootstrap interval."""
    values = values.double().flatten()
    generator = torch.Generator().manual_seed(seed)
    means = values[torch.randint(len(values), (resamples, len(values)), generator=generator)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return values.mean().item(), low, high

