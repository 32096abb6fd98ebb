"""What a run trains (``Setup``: model, preprocessing, batches) and what one step touches
(``Learner``: optimizer, schedule, EMA, lookahead, loss, wrappers); the lookahead (``lookahead``) and
DDP's BatchNorm (``sync_batch_norm``) live in their own modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from allconv_cli.data.batches import Batches
from allconv_cli.models.initialization import first_conv
from allconv_cli.models.registry import create_model, resolve_name
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.lookahead import Lookahead
from allconv_cli.train.optim import make_optimizer, make_scheduler
from allconv_cli.train.settings import model_kwargs
from allconv_cli.train.sync_batch_norm import sync_batch_norm


def memory_format(config: TrainConfig) -> torch.memory_format:
    """The run's memory format for images and weights."""
    return torch.channels_last if config.channels_last else torch.contiguous_format


def make_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The run's network, on the CPU, as built before its weights start: the registry's model with
    the run's options, and BatchNorm's momentum (a training setting: set on every build, resumes
    included)."""
    model = create_model(resolve_name(config.model), **model_kwargs(config, num_classes))
    for norm in model.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.momentum = config.bn_momentum
    return model


def place_model(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """``model`` as the step trains it: the first conv frozen with --whiten frozen (on resume too),
    on ``device`` in the run's memory format. The trainer and the benchmark both build with it."""
    if config.whiten == "frozen":
        first_conv(model).requires_grad_(False)
    return model.to(device, memory_format=memory_format(config))


@dataclasses.dataclass
class Setup:
    """What a run trains on, built from its config: model, preprocessing and batches."""

    model: nn.Module
    preprocess: nn.Module
    classes: list[str]
    input_size: tuple[int, int, int]
    train: Batches
    evaluate: Batches
    test: Batches | None  # only when evaluate is a validation split


@dataclasses.dataclass
class Learner:
    """Everything one training step touches. ``model`` holds the fp32 weights; ``step_model``
    runs the step (the model, or its DDP / compiled wrapper)."""

    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: nn.Module | None  # timm's ModelEmaV3: evaluated and saved instead of the raw weights
    lookahead: "Lookahead | None"  # airbench's lookahead; its slow copy is saved in state.pt
    scaler: torch.amp.GradScaler | None  # fp16 only
    criterion: nn.Module
    mixup: Callable | None  # timm's Mixup for augment = "strong"
    preprocess: nn.Module
    config: TrainConfig  # precision resolved
    rank: int = 0

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


def make_learner(config: TrainConfig, model: nn.Module, preprocess: nn.Module, num_classes: int,
                 steps_per_epoch: int, rank: int = 0, world: int = 1) -> Learner:
    """The optimizer, schedule, EMA, loss and wrappers of a run around ``model`` (on its device).

    Under DDP (``world`` > 1) BatchNorm becomes ``SyncBatchNorm``, so that every process
    normalizes with the statistics of the global batch, as one process would; and the EMA and
    lookahead copies are taken after DDP has broadcast rank 0's weights, so every rank averages
    from the same start."""
    device = next(model.parameters()).device
    step_model = model
    if world > 1:
        sync_batch_norm(model)
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, config)
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
    lookahead = (Lookahead(model, config.lookahead_decay, steps_per_epoch, config.epochs * steps_per_epoch)
                 if config.lookahead_decay > 0 else None)
    if config.compile:
        step_model = torch.compile(step_model, mode=compile_mode(device, world))
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    mixup, criterion = _loss(config, num_classes)
    return Learner(model, step_model, optimizer, make_scheduler(optimizer, config, steps_per_epoch), ema, lookahead, scaler,
                   criterion, mixup, preprocess, config, rank)


def compile_mode(device: torch.device, world: int = 1) -> str | None:
    """torch.compile's mode for the step's network: on one GPU "reduce-overhead", which replays
    the forward and the backward as CUDA graphs, a few launches instead of one per op (the step
    is launch-bound there); elsewhere the default (CPU kernels gain nothing from graphs, and DDP's
    gradient hooks run between the backward's kernels)."""
    return "reduce-overhead" if device.type == "cuda" and world == 1 else None


def _loss(config: TrainConfig, num_classes: int):
    """(mixup or None, criterion): CutMix/Mixup with soft targets for ``strong`` augmentation."""
    if config.augment == "strong":

        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=config.label_smoothing,
                      num_classes=num_classes, mode="batch")
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
