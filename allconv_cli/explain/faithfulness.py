"""Faithfulness of saliency maps: does a map point at what the model uses?

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

Model-free reference maps (``MODEL_FREE``): ``random`` (uniform noise, seeded) and ``sobel``
(the Sobel gradient magnitude of the image in [0, 1], summed over colour channels): a method
that does not beat ``sobel`` ranks pixels no better than "where the edges are".
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.fx.proxy import TraceError

from allconv_cli.data.datasets import load_split
from allconv_cli.data.batches import Batches
from allconv_cli.data.splits import limit
from allconv_cli.device import autocast, resolve_precision, tune_cpu_allocator
from allconv_cli.explain.methods import METHODS, SALIENCY_METHODS
from allconv_cli.explain.saliency import saliency_maps
from allconv_cli.explain.targets import (
    class_index,
    class_label,
    default_layer,
    eval_mode,
    get_layer,
    select_targets,
)
from allconv_cli.files.loading import LoadedModel
from allconv_cli.util import did_you_mean

__all__ = ["BASELINES", "METRICS", "MODEL_FREE", "ROAD_FRACTIONS", "FaithfulnessResult", "auc", "baseline_inputs",
           "check_baseline", "check_methods", "faithfulness", "faithfulness_chart", "impute", "interval", "model_free_map", "perturbation_curves",
           "relevance", "removal_ranks"]

METRICS = ("deletion", "insertion", "road_morf", "road_lerf")
LOWER_IS_BETTER = {"deletion": True, "insertion": False, "road_morf": True, "road_lerf": False}
BASELINES = ("blur", "zero")
MODEL_FREE = ("random", "sobel")
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
    if steps < 1:
        raise ValueError(f"--steps {steps}: give at least 1")
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


@dataclass
class FaithfulnessResult:
    """Every method's perturbation curves, one row per image."""

    methods: list[str]  # saliency methods (see METHODS) and model-free maps (MODEL_FREE)
    curves: dict[str, dict[str, torch.Tensor]]  # method -> metric -> (N, K) class probabilities
    classes: torch.Tensor  # (N,) the explained class of each image
    labels: torch.Tensor | None  # (N,) the data set's labels, when scored on a split
    names: list[str]  # each image's file, or split and index
    source: str  # what was scored, in words
    selection: str  # which class, in words
    baseline: str
    steps: int
    seed: int
    precision: str
    cam_layer: str | None
    seconds: float = 0.0
    fractions: list[float] = field(default_factory=list)  # deletion / insertion x axis, 0 to 1

    def scores(self) -> dict[str, dict[str, torch.Tensor]]:
        """method -> metric -> (N,): AUC of deletion and insertion, mean over levels for ROAD."""
        return {m: {metric: auc(c) if metric in ("deletion", "insertion") else c.mean(1)
                    for metric, c in curves.items()} for m, curves in self.curves.items()}

    def table(self) -> list[dict]:
        """One row per method: each metric's mean over images and 95 % bootstrap interval."""
        rows = []
        for method, metrics in self.scores().items():
            row = {"method": method}
            for metric, values in metrics.items():
                row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = interval(values, self.seed)
            rows.append(row)
        return rows


def _scoring_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for the forward passes that score perturbed images: each BatchNorm
    folded into the conv before it (torch.fx; 1.85x in bf16 on the CPU for the bundled All-CNN-C,
    measured), channels_last. A model that torch.fx cannot trace is copied unfused. The maps use
    ``model`` itself, untouched."""
    plain = copy.deepcopy(model).eval()
    try:
        scorer = fuse(plain)
    except (TraceError, TypeError, RuntimeError, NotImplementedError, AttributeError):  # how fx tracing fails
        scorer = plain
    return scorer.to(memory_format=torch.channels_last)


def _maps(loaded: LoadedModel, images, inputs, targets, methods, cam_layer, generator) -> dict[str, torch.Tensor]:
    """Each method's relevance (B, H, W) on this batch; saliency maps in fp32 (explain's default)."""
    out = {}
    for method in methods:
        if method in MODEL_FREE:
            out[method] = relevance(model_free_map(method, images, generator))
        else:
            out[method] = relevance(saliency_maps(loaded.model, inputs, targets, method, cam_layer=cam_layer))
    return out


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """Validate method names; default: every saliency method and both model-free maps."""
    known = (*METHODS, *MODEL_FREE)
    chosen = list(dict.fromkeys(m.strip() for m in (methods or known) if m.strip()))
    for method in chosen:
        if method not in known:
            raise ValueError(f"unknown method {method!r}{did_you_mean(method, known)}; choose from {', '.join(known)}")
    if not chosen:
        raise ValueError(f"no method given; choose from {', '.join(known)}")
    return chosen


def _batches(loaded: LoadedModel, paths, dataset, split, data_dir, count, batch_size, seed):
    """-> (names, labels or None, iterator of (images in [0, 1], inputs) batches on the model's device)."""
    device = next(loaded.model.parameters()).device
    if paths:
        images, inputs = loaded.read_images(paths)
        chunks = [(images[i:i + batch_size], inputs[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        return [str(p) for p in paths], None, iter(chunks)
    data = load_split(dataset, split, data_dir, loaded.input_size, fit=(loaded.interpolation, loaded.crop_pct))
    data = limit(data, count, seed)
    names = [f"{dataset} {split} #{i}" for i in range(len(data))]

    def batches():
        for images, _ in Batches(data, batch_size, shuffle=False, device=device).epoch(0):
            pixels = images.float() / 255
            with torch.no_grad():
                yield pixels, loaded.preprocess(pixels)

    return names, data.labels, batches()


def faithfulness(
    loaded: LoadedModel,
    paths: Sequence[str | Path] | None = None,
    *,
    dataset: str = "sample",
    split: str = "test",
    data_dir: str | Path | None = None,
    count: int | None = None,
    methods: Sequence[str] | None = None,
    target_class: int | str = "predicted",
    cam_layer: str | None = None,
    baseline: str = "blur",
    steps: int = 10,
    seed: int = 0,
    precision: str = "auto",
    batch_size: int = 250,
    progress: Callable[[int, int], None] | None = None,
) -> FaithfulnessResult:
    """Score every method's maps on image files ``paths``, or on ``split`` of ``dataset`` (at most
    ``count`` images, a seeded random subset), for each image's predicted class or ``target_class``
    (name or index). Maps are computed in fp32; the perturbed images are scored under
    ``precision`` (auto: bf16 where the device has it natively). ``cam_layer``: Grad-CAM's
    layer (default: the last conv). ``progress(done, total)`` is called after each batch."""
    started = time.perf_counter()
    methods = check_methods(methods)
    check_baseline(baseline)
    if steps < 1 or batch_size < 1 or (count is not None and count < 1):
        raise ValueError("--steps, --batch-size and --limit take a whole number of at least 1")
    model = loaded.model
    cam_layer = cam_layer or (default_layer(model) if any(m in ("gradcam", "guided-gradcam") for m in methods) else None)
    if cam_layer is not None:
        get_layer(model, cam_layer)
    target_class = class_index(loaded.classes, target_class)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    names, labels, batches = _batches(loaded, paths, dataset, split, data_dir, count, batch_size, seed)
    scorer = _scoring_copy(model)
    if device.type == "cpu":
        tune_cpu_allocator()  # the imputation's 16 MiB tensors would otherwise be mapped afresh each time
    generator = torch.Generator().manual_seed(seed)
    curves, classes, done = {m: [] for m in methods}, [], 0
    for images, inputs in batches:
        targets = select_targets(model, inputs, None, target_class=target_class)
        explained = torch.tensor([t.channel for t in targets], device=inputs.device)
        for method, scores in _maps(loaded, images, inputs, targets, methods, cam_layer, generator).items():
            curves[method].append(perturbation_curves(scorer, inputs, explained, scores, baseline=baseline, steps=steps,
                                                      generator=generator, precision=precision, batch_size=batch_size))
        classes.append(explained.cpu())
        done += len(inputs)
        if progress is not None:
            progress(done, len(names))
    joined = {m: {metric: torch.cat([c[metric] for c in parts]) for metric in METRICS} for m, parts in curves.items()}
    selection = "each image's predicted class" if target_class == "predicted" else \
        f"the class {class_label(loaded.classes, target_class)}"
    source = f"{len(names)} image files" if paths else \
        f"{len(names)} images of {dataset} {split}" + (f" (a random subset, seed {seed})" if count else "")
    return FaithfulnessResult(methods, joined, torch.cat(classes), labels, names, source, selection, baseline, steps,
                              seed, precision, cam_layer, time.perf_counter() - started,
                              [k / steps for k in range(steps + 1)])


_PANELS = {"deletion": "deletion (lower is better)", "insertion": "insertion (higher is better)",
           "road_morf": "ROAD, most relevant first (lower is better)",
           "road_lerf": "ROAD, least relevant first (higher is better)"}
_DPI = 100
_FONT = 8  # points


def faithfulness_chart(result: FaithfulnessResult, title: str) -> bytes:
    """The mean curve over images of every method, a panel per metric -> PNG bytes."""
    fig = Figure(figsize=(4.0 * len(_PANELS), 3.8), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(_PANELS), sharey=True)
    rows = {row["method"]: row for row in result.table()}
    for ax, (metric, panel) in zip(axes, _PANELS.items()):
        xs = result.fractions if metric in ("deletion", "insertion") else list(ROAD_FRACTIONS)
        for method in result.methods:
            style = dict(linestyle="--", color="grey" if method == "random" else "black") if method in MODEL_FREE else {}
            title = SALIENCY_METHODS[method].title if method in SALIENCY_METHODS else f"{method} map"
            label = f"{title} ({rows[method][metric]:.3f})"
            ax.plot([100 * x for x in xs], result.curves[method][metric].mean(0).tolist(), marker="o", markersize=2.5,
                    label=label, **style)
        ax.set_title(panel, fontsize=_FONT + 1)
        ax.set_xlabel("pixels inserted (%)" if metric == "insertion" else "pixels removed (%)", fontsize=_FONT)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=_FONT)
        ax.legend(fontsize=_FONT - 1, title="AUC" if metric in ("deletion", "insertion") else "mean", title_fontsize=_FONT - 1)
    axes[0].set_ylabel("probability of the explained class, mean over images", fontsize=_FONT)
    fig.suptitle(title, fontsize=_FONT + 1)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
