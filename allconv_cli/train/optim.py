"""Optimizers and learning-rate schedules of a run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from allconv_cli.device import resolve_precision
from allconv_cli.train.config import TrainConfig


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer (``OPTIMIZERS[config.optimizer]``) over its parameter groups.

    With ``decay_all`` off, biases and BatchNorm parameters (every parameter of fewer than 2
    dimensions) are not decayed. Biases (BatchNorm shifts, conv biases) learn at
    ``lr * bias_lr_scale``; where they are decayed, their decay is divided by the same factor, so
    that the decay per step (lr x weight decay) stays the weights' (airbench's bias scaling).
    An optimizer with a rule of its own for the conv weights gets them as a group of their own.

    One group per distinct (lr, decay, own rule), parameters in the model's order, the weights first
    (the group whose rate the log reports): with a scale of 1 the groups are those of runs saved
    before the scale existed, so their optimizer states still load. A frozen parameter is left out."""
    entry = OPTIMIZERS[config.optimizer]
    groups: dict[tuple[float, bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr_scale = config.bias_lr_scale if param.ndim <= 1 and name.endswith("bias") else 1.0
            own_rule = entry.own_weight_rule and param.ndim > 1
            groups.setdefault((lr_scale, param.ndim > 1 or config.decay_all, own_rule), []).append(param)
    # the weights' group first even where the first conv is frozen and a BatchNorm comes first
    ordered = sorted(groups.items(), key=lambda group: not any(p.ndim > 1 for p in group[1]))
    param_groups = [{"params": params, "lr": config.lr * lr_scale,
                     "weight_decay": config.weight_decay / lr_scale if decayed else 0.0}
                    for (lr_scale, decayed, _), params in ordered]
    return entry.build(param_groups, config, next(model.parameters()).device)


def _sgd(param_groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def _muon(param_groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # the weights' group (first): Muon's step, with no SGD momentum or decay of its own
    param_groups[0].update(lr=config.muon_lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                           muon_momentum=config.muon_momentum)
    # bf16 where the run computes in it (natively), else fp32: with oneDNN held to AVX2, bf16
    # matmuls took 890 ms a step here against fp32's 26 ms (AMX: bf16 15 ms)
    fp32 = resolve_precision(config.precision, device) == "fp32"
    return Muon(param_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                dtype=torch.float32 if fp32 else torch.bfloat16)


@dataclass(frozen=True)
class Optimizer:
    """An entry of ``OPTIMIZERS``: how to build it from the run's parameter groups, and whether
    the conv weights take a rule of their own (then they come as the first group)."""

    build: Callable[[list[dict], TrainConfig, torch.device], torch.optim.Optimizer]
    own_weight_rule: bool


def orthogonalize(matrix: torch.Tensor, dtype: torch.dtype = torch.bfloat16, steps: int = 5) -> torch.Tensor:
    """(m, n) -> (m, n) of the same row and column spaces with every singular value near 1
    (between about 0.7 and 1.2): Keller Jordan's quintic Newton-Schulz iteration, computed in
    ``dtype``, whose coefficients push small singular values up fast rather than converge exactly."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the (short, long) orientation: the Gram matrix is short x short
    x = x / (x.norm() + 1e-7)  # Frobenius norm 1 bounds every singular value by 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class Muon(torch.optim.SGD):
    """torch's SGD, where groups holding ``muon_momentum`` take Muon's step instead (Keller Jordan;
    airbench's conv filters): Nesterov momentum of the gradients, orthogonalized as an
    (out, in x kh x kw) matrix so that every direction in the filter bank moves alike.

    Before each step a bank is rescaled to Frobenius norm sqrt(out), which changes nothing the
    net computes because a BatchNorm follows every conv (``validate`` demands it); the update is
    scaled to about that norm too, so ``lr`` is the share of a bank's norm one step moves,
    independent of its shape, and no weight decay is needed to hold the norm. ``dtype`` is the
    orthogonalization's: a property of the machine, not of the run, so not in the state."""

    def __init__(self, params, dtype: torch.dtype = torch.bfloat16, **sgd):
        super().__init__(params, **sgd)
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if "muon_momentum" not in group:
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "muon_buffer" not in state:
                    state["muon_buffer"] = torch.zeros_like(param.grad)
                buffer = state["muon_buffer"].mul_(group["muon_momentum"]).add_(param.grad)
                direction = param.grad.add(buffer, alpha=group["muon_momentum"])  # Nesterov
                param.mul_(param.shape[0] ** 0.5 / param.norm().clamp(min=1e-12))  # all-zero stays zero
                update = orthogonalize(direction.flatten(1), self.dtype)  # (out, in x kh x kw)
                # Frobenius norm about sqrt(min(out, in x kh x kw)): scaled to sqrt(out) for banks of few inputs
                # (conv1's 96 x 27); SGD without momentum or decay in this group steps by exactly -lr x it
                param.grad = update.mul_(max(1.0, update.shape[0] / update.shape[1]) ** 0.5).view_as(param)
        return super().step(closure)


# One entry per name of ``choices.OPTIMIZERS`` (whose text is --optimizer's help).
OPTIMIZERS = {"sgd": Optimizer(_sgd, own_weight_rule=False), "muon": Optimizer(_muon, own_weight_rule=True)}


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    """A per-step learning-rate schedule from torch's schedulers: a linear warm-up from lr / 10
    over ``warmup_epochs`` (none where that rounds to no step), then the schedule's main part.
    ``onecycle`` is that warm-up and a linear decay to lr / 1000 at the run's last step, for any
    number of steps (torch's OneCycleLR divides by zero with a warm-up of under two)."""
    sched = torch.optim.lr_scheduler
    total = config.epochs * steps_per_epoch
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "onecycle":
        main = sched.LinearLR(optimizer, start_factor=1.0, end_factor=1e-3, total_iters=max(1, total - 1 - warmup))
    elif config.schedule == "paper":
        main = sched.MultiStepLR(optimizer, [m * steps_per_epoch - warmup for m in config.milestones],
                                 gamma=config.gamma)
    elif config.schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
