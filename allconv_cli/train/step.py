"""The one training step: augmentation, preprocessing, autocast forward, loss, backward,
optimizer, schedule, EMA; timed as it is by ``allconv benchmark``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from allconv_cli.data import augmentation
from allconv_cli.data.batches import Batches
from allconv_cli.device import autocast
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.learner import Learner, memory_format


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """Augmentation seed of one step, so that any step replays after a resume; below 2^63 for
    every valid seed (torch's generators take at most 64 bits)."""
    return (((seed * 1_000_003 + rank) * 10_007 + epoch) * 1_000_003 + step) % 2**63


def flip_plan(count: int, seed: int) -> torch.Tensor:
    """(count,) bool: which images are mirrored in even epochs with ``flips = "alternate"``; odd
    epochs mirror the others, so every image is seen both ways every two epochs."""
    return torch.rand(count, generator=torch.Generator().manual_seed(seed)) < 0.5


def epoch_flips(plan: torch.Tensor | None, batches: Batches, epoch: int) -> torch.Tensor | None:
    """The mirroring of this rank's images in ``epoch``, in batch order, under ``plan`` (None:
    random flips), on the batches' device, copied there once an epoch rather than every step;
    step k's images are entries k * batch_size onwards."""
    if plan is None:
        return None
    return (plan[batches.order(epoch)] ^ bool(epoch % 2)).to(batches.device)


def batch_inputs(config: TrainConfig, preprocess: nn.Module, images: torch.Tensor, epoch: int, step: int,
                 generator: torch.Generator, rank: int = 0, flips: torch.Tensor | None = None) -> torch.Tensor:
    """The data path of a step: uint8 (B, C, H, W) -> augmented (seeded by the step; ``flips``,
    (B,) bool, chooses the mirrored images instead of chance), scaled to [0, 1], preprocessed
    float input in the run's memory format. ``flips`` must be on the images' device."""
    generator.manual_seed(step_seed(config.seed, rank, epoch, step))
    x = augmentation.augment(images, config.augment, generator, config.shift,
                         size=config.crop if epoch < config.crop_epochs else None,
                         flips=flips)
    return preprocess(x.float() / 255).contiguous(memory_format=memory_format(config))


def train_step(learner: Learner, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int,
               generator: torch.Generator, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on a uint8 (B, C, H, W) batch -> (loss, correct count), both still on the device:
    reading them is left to the caller, so the step itself never waits for the device."""
    config = learner.config
    if config.compile:  # a new iteration for CUDA graphs: last step's graph outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    x = batch_inputs(config, learner.preprocess, images, epoch, step, generator, learner.rank, flips)
    target = labels
    if learner.mixup is not None:
        np.random.seed(step_seed(config.seed, learner.rank, epoch, step) % 2**32)  # timm's Mixup uses numpy's
        x, target = learner.mixup(x, labels)
    with autocast(x.device, config.precision):
        logits = learner.step_model(x)
    loss = learner.criterion(logits.float(), target)  # the loss in fp32
    learner.optimizer.zero_grad(set_to_none=True)
    if learner.scaler is not None:
        learner.scaler.scale(loss).backward()
        learner.scaler.step(learner.optimizer)  # host sync: the scaler reads whether gradients overflowed
        learner.scaler.update()
    else:
        loss.backward()
        learner.optimizer.step()
    learner.scheduler.step()
    if learner.lookahead is not None:
        learner.lookahead.update(learner.model, epoch, step)
    if learner.ema is not None:
        learner.ema.update(learner.model)
    return loss.detach(), (logits.detach().argmax(1) == labels).sum()
