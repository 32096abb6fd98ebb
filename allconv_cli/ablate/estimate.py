"""What an ablation will cost, before any run: its runs, epochs and images, counted without reading
an image, and its duration from one measured training step per combination."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from allconv_cli import benchmark
from allconv_cli.data import datasets, folders
from allconv_cli.device import resolve_device
from allconv_cli.models.registry import default_config, resolve_name
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.learner import make_model
from allconv_cli.util import plural

# Images of the timed step on the CPU, whose speed per image does not depend on the batch: 25.6 and
# 26.9 img/s at 16 and 64 (all-cnn-c, smoke's recipe, 2-core AMD EPYC, 2026-12-07); a GPU's does.
CPU_TIMED_BATCH = 16
# (train, test) images of the data sets whose size is fixed: a dry run counts without reading them
SPLIT_IMAGES = {"sample": (4_000, 1_000), "cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}


def runs_per_unit(grid: list[float], seeds: list[int]) -> int:
    """Runs of one model under one combination: the rate grid with the first seed, then the other seeds."""
    return len(grid) + len(seeds) - 1


def cost(configs: list[TrainConfig], grid: list[float], seeds: list[int], sizes: list[dict]) -> dict:
    """Runs, epochs and training images the ablation will process: ``configs`` the first run of
    each model and combination, ``sizes`` their ``split_sizes``."""
    runs = runs_per_unit(grid, seeds)
    return {"runs": runs * len(configs), "epochs": runs * sum(c.epochs for c in configs),
            "training_images": runs * sum(c.epochs * s["train"] for c, s in zip(configs, sizes))}


def split_sizes(config: TrainConfig) -> dict[str, int]:
    """Images one run trains on (an epoch), evaluates on (over the whole run) and the test
    images among those, without reading any: the known sizes of sample and CIFAR, or the files
    of an image folder, counted. Limits and the validation split are applied as training does."""

    datasets.check_source(config.dataset, config.data_dir)
    if config.dataset in SPLIT_IMAGES:
        train, test = SPLIT_IMAGES[config.dataset]
    else:
        if config.data_dir is None:
            raise ValueError("--dataset imagefolder needs --data-dir DIR (with train/ and val/ or test/)")
        root = Path(config.data_dir)
        # the same folders and scan (and the same errors for a wrong layout) as training's, without decoding
        train, test = (len(folders.scan_folder(root / name)[1]) for name in folders.split_folders(root, "train"))
    train, test = min(train, config.train_limit or train), min(test, config.test_limit or test)
    val = round(train * config.val_fraction)
    evaluations = math.ceil(config.epochs / config.eval_every)  # the last epoch is always evaluated
    # with a validation split, each evaluation scores it and test is scored once at the end
    evaluated_images = evaluations * val + test if val else evaluations * test
    return {"train": train - val, "evaluated": evaluated_images, "test": test}


def conv_flops(config: TrainConfig) -> dict[str, int]:
    """FLOPs per image of ``config``'s network (forward, train), from the network built on the CPU."""
    registered = default_config(resolve_name(config.model))
    return benchmark.count_flops(make_model(config, registered["num_classes"]), tuple(registered["input_size"]))


def estimate_seconds(configs: list[TrainConfig], grid: list[float], seeds: list[int], sizes: list[dict]) -> dict:
    """The ablation's duration: for each combination of --grid, one timed training step of its
    first model with the runs' own recipe (``allconv benchmark``'s train mode: its optimizer,
    lookahead, precision, batch size and device, after one warm-up step, on synthetic data); each
    other model's speed scaled from it by the networks' FLOPs, and evaluation by the forward pass's
    share of a training step's. ``configs`` and ``sizes`` as for ``cost``. On the CPU the step is
    timed on CPU_TIMED_BATCH images. Assumes full-size images (--crop epochs are cheaper)."""
    per_model: dict[str, dict] = {}
    measured, total = {}, 0.0  # measured: the combination's speed in training FLOPs/s -> the benchmark's report
    for config, size in zip(configs, sizes):
        most = CPU_TIMED_BATCH if resolve_device(config.device).type == "cpu" else size["train"]
        recipe = dataclasses.replace(config, batch_size=min(config.batch_size, max(1, most)))
        speed_key = dataclasses.replace(recipe, model="", lr=0.0, seed=0).to_json()
        flops = conv_flops(recipe)
        if speed_key not in measured:
            report = benchmark.run(recipe, "train", steps=1, warmup=1, speed_only=True)
            measured[speed_key] = report, report["results"]["train"]["images_per_s"] * flops["train"]
        report, flops_per_s = measured[speed_key]
        train_speed = flops_per_s / flops["train"]
        eval_speed = train_speed * flops["train"] / flops["forward"]
        seconds = runs_per_unit(grid, seeds) * (config.epochs * size["train"] / train_speed
                                                 + size["evaluated"] / eval_speed)
        entry = per_model.setdefault(config.model, {"images_per_s": train_speed, "seconds": 0.0})
        entry["seconds"] += seconds
        total += seconds
    return {"seconds": total, "per_model": per_model, "device": report["device"],
            "device_name": report["device_name"], "precision": report["precision"],
            "measured": f"{plural(len(measured), 'training step')} after a warm-up step, "
                        "synthetic data; other networks scaled by their FLOPs"}
