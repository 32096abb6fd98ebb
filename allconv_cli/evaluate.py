"""Evaluation shared by train, eval, ablate and the bundling script: errors, loss, per-class
accuracy and the confusion matrix of a model on a split, beside the paper's figure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli.choices import TTA
from allconv_cli.data import datasets, splits
from allconv_cli.data.batches import Batches
from allconv_cli.device import autocast, resolve_device, resolve_precision
from allconv_cli.files.loading import load_checkpoint
from allconv_cli.models.registry import (
    CIFAR10_CLASSES,
    NETWORKS,
    network_name,
    resolve_name,
)


def predict(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Float (B, C, H, W) model inputs -> (B, classes) fp32 logits; with ``tta``, the log of the
    weighted mean softmax of the views: ``flip`` the image and its mirror; ``flip-shift`` adds both
    moved by one pixel down-right and up-left (reflected borders), weighted half as much."""
    if tta == "none":
        return model(x).float()
    views = [(x, 1.0), (x.flip(3), 1.0)]
    if tta == "flip-shift":
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        height, width = x.shape[2:]
        for shifted in (padded[:, :, :height, :width], padded[:, :, 2:, 2:]):
            views += [(shifted, 0.5), (shifted.flip(3), 0.5)]
    total = sum(weight for _, weight in views)
    return sum(model(view).float().softmax(1) * (weight / total) for view, weight in views).log()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, prep: nn.Module, num_classes: int,
             tta: str = "none", precision: str = "fp32", memory_format=torch.channels_last,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Top-1 / top-5 error (%), mean loss, per-class accuracy (%) and the confusion matrix
    (rows: true class, columns: predicted). ``tta`` is one of TTA (see ``predict``); ``precision`` is a resolved name (fp32, bf16, fp16). Under DDP the counts are summed
    over all processes. ``progress(batches done, batches)`` is called after each batch is queued
    (on CUDA, before it has run: the loop never waits for the device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-5 hits
    for step, (images, labels) in enumerate(batches.epoch(0), 1):
        x = prep(images.float() / 255).contiguous(memory_format=memory_format)
        with autocast(device, precision):
            logits = predict(model, x, tta)
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, num_classes), dim=1).indices
        totals[1] += (top == labels[:, None]).any(1).sum()
        confusion.view(-1).index_add_(0, labels * num_classes + top[:, 0], torch.ones_like(labels))
        if progress is not None:
            progress(step, len(batches))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    count = confusion.sum().item()
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1).double()
    return {
        "count": count,
        "loss": totals[0].item() / count,
        "top1_error": 100 * (1 - confusion.diag().sum().item() / count),
        "top5_error": 100 * (1 - totals[1].item() / count),
        "per_class_accuracy": (100 * per_class).tolist(),
        "confusion": confusion.cpu().tolist(),
    }


def paper_setting(dataset: str, classes: list[str], augment: str) -> str | None:
    """Which of the paper's settings a run on this data compares with, as the registry's
    ``paper_error`` keys it (cifar10, cifar10-aug, cifar100, imagenet), or None where the paper
    has none (the bundled sample, other classes)."""
    if dataset == "sample":
        return None  # 4,000 training images: not comparable with the paper's 50,000
    if dataset == "cifar10" or tuple(classes) == CIFAR10_CLASSES:
        return "cifar10" if augment == "none" else "cifar10-aug"
    if dataset == "cifar100":
        return "cifar100"
    return "imagenet" if len(classes) == 1000 else None


def paper_error(model: str, options: dict, dataset: str, classes: list[str], augment: str) -> float | None:
    """The paper's test error (%) for this model, built with ``options`` (its model_kwargs), on this
    data set, where it reports one: None for a network that is not the paper's (network_name)."""
    setting, (shown, papers) = paper_setting(dataset, classes, augment), network_name(model, options)
    return NETWORKS[resolve_name(shown)].paper_error.get(setting) if setting is not None and papers else None


def evaluate_checkpoint(path: str | Path, dataset: str | None = None, data_dir: str | None = None,
                        split: str = "test", tta: str = "none", batch_size: int = 256,
                        device: str = "auto", limit: int | None = None, workers: int = 2,
                        precision: str = "auto", progress: Callable[[int, int], None] | None = None) -> dict:
    """Evaluate a run folder or checkpoint on a split -> metrics, classes and the paper's error."""
    if tta not in TTA:
        raise ValueError(f"unknown --tta {tta!r}: use one of {', '.join(TTA)}")
    for option, value in (("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and value < 1:  # above the split's size, either is the whole split
            raise ValueError(f"{option} {value} is not allowed: {option} takes a whole number of at least 1")
    dev = resolve_device(device)
    arithmetic = resolve_precision(precision, dev)
    loaded = load_checkpoint(path, device=dev)
    meta = loaded.meta
    dataset = dataset or meta.get("dataset")
    if dataset is None:
        raise ValueError(f"{path} does not say which data set it was trained on: give --dataset")
    data_dir = data_dir if data_dir is not None else (meta.get("data_dir") if dataset == meta.get("dataset") else None)
    fit = (loaded.interpolation, loaded.crop_pct)
    data = splits.limit(datasets.load_split(dataset, split, data_dir, loaded.input_size, workers, fit), limit)
    classes = meta["classes"]
    if len(data.classes) != len(classes):
        raise ValueError(f"{path} predicts {len(classes)} classes but {dataset} has {len(data.classes)}: "
                         "evaluate on the data set it was trained on")
    if list(data.classes) != list(classes):
        differ = [f"{a} / {b}" for a, b in zip(classes, data.classes) if a != b]
        raise ValueError(f"{path} was trained on other class names than {dataset}'s ({', '.join(differ[:3])}"
                         f"{' ...' if len(differ) > 3 else ''}): its labels would mean other classes here")
    model = loaded.model.to(memory_format=torch.channels_last)
    batches = Batches(data, batch_size, shuffle=False, device=dev, workers=workers)
    result = evaluate(model, batches, loaded.preprocess, len(classes), tta=tta, precision=arithmetic, progress=progress)
    result.update({"classes": classes, "dataset": dataset, "split": split, "checkpoint": str(path),
                   "model": meta["model"].replace("_", "-"), "epoch": meta.get("epoch"), "tta": tta, "precision": arithmetic,
                   "network": network_name(meta["model"], meta.get("model_kwargs"))[0],
                   "paper_error": paper_error(meta["model"], meta.get("model_kwargs", {}), dataset, classes,
                                              meta.get("augment", "none"))})
    return result
