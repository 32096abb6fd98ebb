"""The faithfulness run: every saliency method's maps, and the model-free reference maps, scored
by the metrics of ``perturbation`` (deletion, insertion, ROAD) on image files or a data set's
split, with each metric's mean over images and a bootstrap interval. ``figures.faithfulness_chart``
draws the mean curves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from allconv_cli.data.batches import Batches
from allconv_cli.data.datasets import load_split
from allconv_cli.data.splits import limit
from allconv_cli.device import resolve_precision, tune_cpu_allocator
from allconv_cli.explain.methods import MODEL_FREE, SALIENCY_METHODS, check_methods, check_settings
from allconv_cli.explain.perturbation import (
    METRICS,
    ROAD_FRACTIONS,
    auc,
    check_baseline,
    check_steps,
    interval,
    model_free_map,
    perturbation_curves,
    relevance,
)
from allconv_cli.explain.rules import fold_batchnorm
from allconv_cli.explain.saliency import black_input, saliency_maps
from allconv_cli.explain.targets import (
    class_index,
    class_label,
    default_layer,
    get_layer,
    select_targets,
)
from allconv_cli.files.loading import LoadedModel

__all__ = ["FaithfulnessResult", "faithfulness"]

BATCH = 250  # images per batch, and perturbed images per forward pass, unless given (or fewer are scored)


@dataclass
class FaithfulnessResult:
    """Every method's perturbation curves, one row per image."""

    methods: list[str]  # saliency methods (methods.SALIENCY_METHODS) and model-free maps (MODEL_FREE)
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
    settings: dict[str, dict] = field(default_factory=dict)  # method -> its settings as used
    seconds: float = 0.0
    fractions: list[float] = field(default_factory=list)  # deletion / insertion x axis, 0 to 1

    def positions(self, metric: str) -> list[float]:
        """The shares of pixels removed (or inserted) at which ``metric``'s curve is measured."""
        return self.fractions if metric in ("deletion", "insertion") else list(ROAD_FRACTIONS)

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
    folded into the conv before it (``rules.fold_batchnorm``; 1.85x in bf16 on the CPU for the
    bundled All-CNN-C, measured), channels_last. The maps use ``model`` itself, untouched."""
    return fold_batchnorm(model).to(memory_format=torch.channels_last)


def _batch_size(batch_size: int | None, images: int) -> int:
    """The images per batch: 1 to the images scored (more would mean the same); default BATCH or fewer."""
    if batch_size is None:
        return min(BATCH, images)
    if not 1 <= batch_size <= images:
        raise ValueError(f"--batch-size {batch_size}: give 1 to {images}, the images scored")
    return batch_size


def _batches(loaded: LoadedModel, paths, dataset, split, data_dir, count, batch_size, seed):
    """-> (names, labels or None, images available, batch size, iterator of (images in [0, 1],
    inputs) batches on the model's device). Image files are all read here, so a bad one fails
    before any scoring."""
    device = next(loaded.model.parameters()).device
    if paths:
        images, inputs = loaded.read_images(paths)
        batch_size = _batch_size(batch_size, len(images))
        chunks = [(images[i:i + batch_size], inputs[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        return [str(p) for p in paths], None, len(paths), batch_size, iter(chunks)
    data = load_split(dataset, split, data_dir, loaded.input_size, fit=(loaded.interpolation, loaded.crop_pct))
    if count is not None and count > len(data):
        raise ValueError(f"--limit {count}: {dataset} {split} has {len(data):,} images; give 1 to {len(data)}, "
                         "or all")
    available, data = len(data), limit(data, count, seed)
    names = [f"{dataset} {split} #{i}" for i in range(len(data))]
    batch_size = _batch_size(batch_size, len(data))

    def batches():
        for images, _ in Batches(data, batch_size, shuffle=False, device=device).epoch(0):
            pixels = images.float() / 255
            with torch.no_grad():
                yield pixels, loaded.preprocess(pixels)

    return names, data.labels, available, batch_size, batches()


def _cam_layer(model: nn.Module, methods: Sequence[str], cam_layer: str | None) -> str | None:
    """The layer the methods that weigh one weigh (checked), or None when no method does."""
    if not any(m in SALIENCY_METHODS and SALIENCY_METHODS[m].needs_layer for m in methods):
        return None
    cam_layer = cam_layer or default_layer(model)
    get_layer(model, cam_layer)
    return cam_layer


def faithfulness(
    loaded: LoadedModel,
    paths: Sequence[str | Path] | None = None,
    *,
    dataset: str = "sample",
    split: str = "test",
    data_dir: str | Path | None = None,
    count: int | None = None,
    methods: Sequence[str] | None = None,
    settings: dict[str, dict] | None = None,
    target_class: int | str = "predicted",
    cam_layer: str | None = None,
    baseline: str = "blur",
    steps: int = 10,
    seed: int = 0,
    precision: str = "auto",
    batch_size: int | None = None,
    ready: Callable[[int, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FaithfulnessResult:
    """Score every method's maps on image files ``paths``, or on ``split`` of ``dataset`` (at most
    ``count`` images, a seeded random subset), for each image's predicted class or ``target_class``
    (name or index). ``settings``: the methods' own (method -> setting -> value; the rest by
    default). Maps in fp32; perturbed images scored under ``precision`` (auto: bf16 where
    the device has it natively), ``batch_size`` images per batch and perturbed images per forward
    pass (1 to the images scored; default BATCH or fewer). ``cam_layer``: the layer Grad-CAM
    weighs (default: the last conv). Once every input is read and checked, before any scoring,
    ``ready(images to score, images available)`` is called (a caller may still refuse there);
    ``progress(maps scored, maps)`` after each method of each batch (a map: one image, one method)."""
    started = time.perf_counter()
    methods = check_methods(methods, model_free=True)
    settings = check_settings(methods, settings)
    check_baseline(baseline)
    check_steps(steps, *loaded.input_size[1:])
    for option, value in (("--limit", count), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{option} {value}: give at least 1")
    cam_layer = _cam_layer(loaded.model, methods, cam_layer)
    target_class = class_index(loaded.classes, target_class)
    precision = resolve_precision(precision, next(loaded.model.parameters()).device)
    names, labels, available, batch_size, batches = _batches(loaded, paths, dataset, split, data_dir, count,
                                                             batch_size, seed)
    if ready is not None:
        ready(len(names), available)
    score = _Scoring(loaded, methods, settings, cam_layer, target_class, baseline, steps, seed, precision, batch_size)

    def report(done: int):
        if progress is not None:
            progress(done, len(names) * len(methods))

    classes = [score.batch(images, inputs, report) for images, inputs in batches]
    selection = "each image's predicted class" if target_class == "predicted" else \
        f"the class {class_label(loaded.classes, target_class)}"
    source = f"{len(names)} image files" if paths else f"{len(names)} images of {dataset} {split}" + (
        f" (a random subset of {available:,}, seed {seed})" if len(names) < available else "")
    return FaithfulnessResult(list(methods), score.joined(), torch.cat(classes), labels, names, source, selection,
                              baseline, steps, seed, precision, cam_layer, settings, time.perf_counter() - started,
                              [k / steps for k in range(steps + 1)])


class _Scoring:
    """The curves of every method, batch by batch, with one random generator for the whole run
    and one per method that draws noise."""

    def __init__(self, loaded, methods, settings, cam_layer, target_class, baseline, steps, seed, precision,
                 batch_size):
        self.model, self.methods, self.settings, self.cam_layer = loaded.model, methods, settings, cam_layer
        self.target_class, self.precision, self.batch_size = target_class, precision, batch_size
        self.curve_options = {"baseline": baseline, "steps": steps}
        device = next(self.model.parameters()).device
        self.scorer = _scoring_copy(self.model)
        if device.type == "cpu":
            tune_cpu_allocator()  # the imputation's 16 MiB tensors would otherwise be mapped afresh each time
        self.black = black_input(loaded)
        self.generator = torch.Generator().manual_seed(seed)
        self.noise = {m: torch.Generator(device).manual_seed(settings[m]["seed"])
                      for m in methods if "seed" in settings.get(m, {})}
        self.curves, self.done = {m: [] for m in methods}, 0

    def batch(self, images: torch.Tensor, inputs: torch.Tensor, progress: Callable[[int], None]) -> torch.Tensor:
        """Score one batch with every method; -> (B,) the explained classes, on the CPU."""
        targets = select_targets(self.model, inputs, None, target_class=self.target_class)
        explained = torch.tensor([t.channel for t in targets], device=inputs.device)
        # The model-free maps draw from the generator before any curve does, so a seed's draws do not
        # depend on when the saliency maps are computed: each just before its curves, so that the
        # first progress report times one method's whole work.
        free = {m: relevance(model_free_map(m, images, self.generator)) for m in self.methods if m in MODEL_FREE}
        for method in self.methods:
            scores = free[method] if method in free else relevance(saliency_maps(  # fp32, as explain's
                self.model, inputs, targets, method, cam_layer=self.cam_layer, settings=self.settings[method],
                generator=self.noise.get(method), black=self.black))
            self.curves[method].append(perturbation_curves(
                self.scorer, inputs, explained, scores, generator=self.generator, precision=self.precision,
                batch_size=self.batch_size, **self.curve_options))
            self.done += len(inputs)
            progress(self.done)
        return explained.cpu()

    def joined(self) -> dict[str, dict[str, torch.Tensor]]:
        """method -> metric -> (N, K): every batch's curves, in order."""
        return {m: {metric: torch.cat([c[metric] for c in parts]) for metric in METRICS}
                for m, parts in self.curves.items()}
