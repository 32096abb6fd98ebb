"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018): does a map depend on the model?

Model randomization: the trained model's weights are replaced by fresh ones from the model's
own initializer, layer by layer, and every method's map is recomputed for the same images and
the same neuron or class. ``cascade`` re-initializes from the top (the class conv, or the
neuron's layer: layers above it cannot change its map) one layer more at each stage;
``independent`` re-initializes one layer at a time. Data randomization (``against``): the maps
of a second model, e.g. one trained on permuted labels (``allconv train --shuffle-labels``).

Similarity to the trained model's map, per image, on the maps as the grid shows them:

- ``spearman_abs``: Spearman rank correlation of |map| (max over colour channels), (H, W);
- ``spearman_signed``: Spearman rank correlation of the signed values, (C, H, W);
- ``ssim``: SSIM (Wang et al., 2004; 11x11 Gaussian window, sigma 1.5, valid positions only,
  C1 = 0.01^2, C2 = 0.03^2) of |map| scaled to [0, 1] by its maximum, as ``--norm abs`` shows it.

A map that is constant (e.g. all zero: every ReLU closed) has no rank correlation: NaN.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli.device import autocast, resolve_precision
from allconv_cli.explain.methods import SALIENCY_METHODS, check_methods, check_settings, fitting
from allconv_cli.explain.saliency import black_input, saliency_maps
from allconv_cli.explain.targets import (
    Target,
    class_index,
    class_label,
    default_layer,
    get_layer,
    select_targets,
)
from allconv_cli.files.loading import LoadedModel
from allconv_cli.models.net import AllConvNet

__all__ = ["METRICS", "MODES", "SanityResult", "randomized", "sanity_check", "similarity", "spearman", "ssim",
           "stages"]

MODES = ("cascade", "independent")
METRICS = ("spearman_abs", "spearman_signed", "ssim")


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank (as scipy.stats.rankdata)."""
    order = values.argsort()
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    average = last - (counts.double() - 1) / 2
    ranks = torch.empty_like(average[inverse])
    ranks[order] = average[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two tensors of the same number of values; NaN if either is
    constant."""
    if a.numel() != b.numel():
        raise ValueError(f"spearman: {a.numel()} values against {b.numel()}")
    ra, rb = _ranks(a.detach().flatten().double().cpu()), _ranks(b.detach().flatten().double().cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = (ra.square().sum() * rb.square().sum()).sqrt()
    return (ra * rb).sum().item() / norm.item() if norm > 0 else math.nan


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> float:
    """Mean SSIM of two (H, W) images with values in [0, ``data_range``]: Gaussian-weighted local
    means, variances and covariance over every ``window`` x ``window`` position inside the
    image (a smaller odd window for images under 11 px)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"ssim compares two (H, W) images, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = min(window, *a.shape)
    size -= 1 - size % 2  # odd
    g = _gaussian(size, sigma)
    kernel = (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k), sums to 1
    x = torch.stack([a, b]).detach().double().cpu()[:, None]  # (2, 1, H, W)

    def mean(t):
        return F.conv2d(t, kernel)

    mu = mean(x)
    mu_a, mu_b = mu[0], mu[1]
    var = mean(x * x) - mu * mu
    cov = mean(x[:1] * x[1:]) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var[0] + var[1] + c2))
    return index.mean().item()


def _abs_map(m: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (H, W): |value|, largest over colour channels."""
    return m.abs().amax(0)


def similarity(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """The three scores (see METRICS) of map ``other`` against ``reference``, both (C, H, W)."""
    ra, oa = _abs_map(reference), _abs_map(other)
    scaled = [m / m.max() if m.max() > 0 else m for m in (ra, oa)]
    return {"spearman_abs": spearman(ra, oa), "spearman_signed": spearman(reference, other),
            "ssim": ssim(*scaled)}


def _fresh(model: AllConvNet, seed: int) -> AllConvNet:
    """A CPU copy of ``model`` re-initialized by its own initializer under ``seed``: every module's
    ``reset_parameters`` (BatchNorm's statistics too), then the model's ``_init_weights``
    (allconv's Xavier weights and 0.1 biases). The global RNG is left as it was."""
    fresh = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        fresh._init_weights()
    return fresh


def randomized(model: AllConvNet, layers: Sequence[str], seed: int = 0,
               fresh: AllConvNet | None = None) -> AllConvNet:
    """A copy of ``model`` whose ``layers`` (conv block names) hold freshly initialized weights;
    ``model`` itself is not touched. ``fresh`` (from the same seed) saves re-initializing."""
    fresh = _fresh(model, seed) if fresh is None else fresh
    out = copy.deepcopy(model)
    for name in layers:
        out.get_layer(name).load_state_dict(fresh.get_layer(name).state_dict())
    return out


def stages(model: AllConvNet, top: str, mode: str) -> list[list[str]]:
    """The layers re-initialized at each stage of ``mode``, from ``top`` (a conv block) downwards."""
    below = model.layer_names[: model.layer_names.index(top) + 1][::-1]  # top first
    if mode == "cascade":
        return [below[: k + 1] for k in range(len(below))]
    return [[name] for name in below]


@dataclass
class SanityResult:
    """Every method's maps for the trained model and each stage, and their similarity."""

    paths: list[str]
    images: torch.Tensor  # (B, C, H, W) in [0, 1]
    targets: list[Target]  # chosen on the trained model, kept at every stage
    layer: str  # the neuron's layer, or for class targets Grad-CAM's layer
    selection: str  # how the targets were chosen, in words
    mode: str  # cascade, independent or against
    stage_names: list[str]  # column titles after "trained"
    randomized_layers: list[list[str]]  # per stage; empty for the against model
    maps: dict[str, torch.Tensor]  # method -> (1 + stages, N, C, H, W), index 0 the trained model
    scores: dict[str, dict[str, torch.Tensor]]  # method -> metric -> (stages, N)
    seed: int
    precision: str
    settings: dict[str, dict] = field(default_factory=dict)  # method -> its settings as used

    def table(self) -> list[dict]:
        """One row per method and stage: the mean over images of each score (NaNs left out),
        and how many images had a defined score."""
        rows = []
        for method, metrics in self.scores.items():
            for s, name in enumerate(self.stage_names):
                row = {"method": method, "stage": name, "randomized": self.randomized_layers[s]}
                for metric, values in metrics.items():
                    defined = values[s][~values[s].isnan()]
                    row[metric] = defined.mean().item() if len(defined) else None
                    row[f"{metric}_images"] = len(defined)
                rows.append(row)
        return rows

    def to_json(self) -> dict:
        """Everything measured, as JSON values: targets, stages, the table and per-image scores
        (an undefined score, a NaN, as null)."""
        return {
            "mode": self.mode, "seed": self.seed, "precision": self.precision, "layer": self.layer,
            "settings": self.settings,
            "selection": self.selection,
            "targets": [{"path": self.paths[t.image], "layer": t.layer, "channel": t.channel, "y": t.y, "x": t.x,
                         "value": t.value} for t in self.targets],
            "stages": [{"name": n, "randomized": r} for n, r in zip(self.stage_names, self.randomized_layers)],
            "table": self.table(),
            "per_image": {m: {k: [[None if v != v else v for v in stage] for stage in values.tolist()]
                              for k, values in metrics.items()} for m, metrics in self.scores.items()}}


def _check_against(loaded: LoadedModel, against: LoadedModel, layer: str):
    """Refuse a data-randomization model that cannot be compared with ``loaded``'s."""
    model = loaded.model
    if not isinstance(against.model, AllConvNet) or against.input_size != loaded.input_size \
            or against.model.num_classes != model.num_classes:
        raise ValueError(f"--against {against.source} is not comparable: it must be an allconv net with "
                         f"input {loaded.input_size} and {model.num_classes} classes, like {loaded.source}")
    get_layer(against.model, layer)


def _similarities(stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """One method's maps (1 + stages, N, C, H, W) -> metric -> (stages, N) similarity to stage 0's."""
    per = [[similarity(stacked[0, i], stacked[s, i]) for i in range(stacked.shape[1])]
           for s in range(1, len(stacked))]
    return {metric: torch.tensor([[row[metric] for row in stage] for stage in per]) for metric in METRICS}


def _check_model(model: nn.Module, mode: str):
    if not isinstance(model, AllConvNet):
        raise ValueError(f"sanity re-initializes allconv nets layer by layer (conv1..convN), not "
                         f"{type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose from {', '.join(MODES)}")


def _selection(loaded: LoadedModel, by_class: bool, target_class, layer: str) -> str:
    """The targets in words, for the result's heading."""
    if not by_class:
        return f"the trained model's most active neuron of {layer}"
    if target_class == "predicted":
        return "each image's class predicted by the trained model"
    return f"the logit of {class_label(loaded.classes, target_class)}"


def sanity_check(
    loaded: LoadedModel,
    paths: Sequence[str | Path],
    layer: str | None = None,
    methods: Sequence[str] | None = None,
    *,
    mode: str = "cascade",
    target_class: int | str | None = None,
    against: LoadedModel | None = None,
    seed: int = 0,
    precision: str = "fp32",
    settings: dict[str, dict] | None = None,
) -> SanityResult:
    """Run the model-randomization test on ``paths`` (or, with ``against``, compare with that
    model), leaving ``loaded.model`` unchanged. Targets: with a class (``target_class``: name, index or ``predicted``) or by default, each
    image's class predicted by the trained model, and ``layer`` is Grad-CAM's (default: the
    last conv); with ``layer`` and no class, the most active neuron of ``layer`` on the trained
    model. Default methods: all that fit the target (those that explain a neuron, for a neuron).
    ``settings``: the methods' own (method -> setting -> value; the rest by default); a method
    that draws noise draws the same at every stage.
    """
    model = loaded.model
    _check_model(model, mode)
    by_class = target_class is not None or layer is None
    target_class = "predicted" if target_class is None and by_class else target_class
    methods = check_methods(methods or fitting(by_class))
    settings = check_settings(methods, settings)
    if not by_class and any(SALIENCY_METHODS[m].needs_class for m in methods):
        raise ValueError(f"{', '.join(m for m in methods if SALIENCY_METHODS[m].needs_class)} explain a class "
                         "score: add --class NAME, INDEX or predicted, or drop --layer")
    layer = default_layer(model) if layer is None else layer
    get_layer(model, layer)
    if by_class:
        target_class = class_index(loaded.classes, target_class)
    if against is not None:
        _check_against(loaded, against, layer)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    images, inputs = loaded.read_images(paths)
    with autocast(device, precision):
        targets = select_targets(model, inputs, None if by_class else layer, target_class=target_class)
        black = black_input(loaded)

        def maps_of(net: nn.Module) -> dict[str, torch.Tensor]:
            return {m: saliency_maps(net, inputs, targets, m, cam_layer=layer, settings=settings[m],
                                     black=black).float().cpu() for m in methods}

        if against is None:
            plan = stages(model, model.layer_names[-1] if by_class else layer, mode)
            fresh = _fresh(model, seed)
            names = [layers[0] if len(layers) == 1 else f"{layers[0]}..{layers[-1]}" for layers in plan]
            computed = [maps_of(model)] + [maps_of(randomized(model, layers, seed, fresh)) for layers in plan]
        else:
            plan, names = [[]], [f"against {Path(against.source).name}"]
            computed = [maps_of(model), maps_of(against.model)]
    maps = {m: torch.stack([c[m] for c in computed]) for m in methods}
    scores = {method: _similarities(stacked) for method, stacked in maps.items()}
    return SanityResult([str(p) for p in paths], images.cpu(), targets, layer,
                        _selection(loaded, by_class, target_class, layer),
                        "against" if against is not None else mode, names, plan, maps, scores, seed, precision, settings)
