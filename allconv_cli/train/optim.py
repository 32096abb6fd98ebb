"""Optimizers and learning-rate schedules of a run."""

from __future__ import annotations

import math

import torch
from torch import nn

from allconv_cli.device import resolve_precision
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.optimizers import OPTIMIZERS


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer (its entry in ``optimizers.OPTIMIZERS``) over its parameter groups.

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
    return entry.builder()(param_groups, config, next(model.parameters()).device)


def sgd(param_groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           **_kernels(device))


def _kernels(device: torch.device) -> dict:
    """SGD's fused kernel (one launch per parameter group, and under fp16 the GradScaler's
    overflow check without a host sync) on the CPU and CUDA; elsewhere its foreach form."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def muon(param_groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # the weights' group (first): Muon's step, with no SGD momentum or decay of its own
    param_groups[0].update(lr=config.muon_lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                           muon_momentum=config.muon_momentum)
    # bf16 where the run computes in it (natively), else fp32: with oneDNN held to AVX2, bf16
    # matmuls took 890 ms a step here against fp32's 26 ms (AMX: bf16 15 ms)
    fp32 = resolve_precision(config.precision, device) == "fp32"
    # foreach, not fused, for the SGD groups: a fused step would take fp16's GradScaler inside,
    # which the conv weights' own step does not
    return Muon(param_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, foreach=True,
                dtype=torch.float32 if fp32 else torch.bfloat16)


def orthogonalize(matrix: torch.Tensor, dtype: torch.dtype = torch.bfloat16, steps: int = 5) -> torch.Tensor:
    """(m, n) or a batch (b, m, n) -> the same shape, each matrix with the same row and column
    spaces and every singular value near 1 (between about 0.7 and 1.2): Keller Jordan's quintic
    Newton-Schulz iteration, computed in ``dtype``, whose coefficients push small singular values
    up fast rather than converge exactly. A batch costs three batched products an iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(dtype)
    x = x if x.ndim == 3 else x[None]
    tall = x.shape[1] > x.shape[2]
    x = x.mT if tall else x  # iterate on the (short, long) orientation: the Gram matrix is short x short
    x = x / (torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True) + 1e-7)  # Frobenius norm 1 bounds every singular value by 1
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # (a + b G + c G^2) x
    x = x.mT if tall else x
    return (x if matrix.ndim == 3 else x[0]).to(matrix.dtype)


class _Bank:
    """Conv weights stacked for one batched orthogonalization: ``directions`` (k, rows, cols)
    fp32, sized by the first (largest) weight's (short, long) matrix, each weight's matrix
    zero-padded into its slot (padding rows and columns stay zero through Newton-Schulz: x x^T
    keeps the zero blocks, so each matrix's result is its own), with views that show each slot
    in its weight's shape; a tall matrix (out > in x kh x kw) is held transposed."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        rows, cols = _short_long(params[0])  # the largest comes first and holds every other
        self.directions = params[0].new_zeros(len(params), rows, cols, dtype=torch.float32)
        self.updates = torch.zeros_like(self.directions)
        self.direction_views = [self._view(self.directions, i, p) for i, p in enumerate(params)]
        self.update_views = [self._view(self.updates, i, p) for i, p in enumerate(params)]
        # the update's Frobenius norm is about sqrt(min(out, in x kh x kw)): scaled to sqrt(out)
        # for banks of few inputs (conv1's 96 x 27)
        self.scale = torch.tensor([max(1.0, p.shape[0] / p[0].numel()) ** 0.5 for p in params],
                                  device=params[0].device).view(-1, 1, 1)

    @staticmethod
    def _view(stack: torch.Tensor, slot: int, param: torch.Tensor) -> torch.Tensor:
        """Slot ``slot`` of ``stack`` (k, rows, cols) as a tensor of ``param``'s shape."""
        out, fan_in = param.shape[0], param[0].numel()
        inner = [math.prod(param.shape[d + 1:]) for d in range(1, param.ndim)]  # flatten(1)'s strides
        cols = stack.shape[2]
        if out <= fan_in:  # row o of slot holds filter o, its inputs along the columns
            strides = (cols, *inner)
        else:  # transposed: column o holds filter o
            strides = (1, *(s * cols for s in inner))
        return stack.as_strided(param.shape, strides, stack.storage_offset() + slot * stack[0].numel())

    def orthogonalize(self, dtype: torch.dtype):
        """updates <- orthogonalized directions, each scaled (see ``scale``)."""
        torch.mul(orthogonalize(self.directions, dtype), self.scale, out=self.updates)


def _short_long(param: torch.Tensor) -> tuple[int, int]:
    out, fan_in = param.shape[0], param[0].numel()
    return min(out, fan_in), max(out, fan_in)


class Muon(torch.optim.SGD):
    """torch's SGD, where groups holding ``muon_momentum`` take Muon's step instead (Keller Jordan;
    airbench's conv filters): Nesterov momentum of the gradients, orthogonalized as an
    (out, in x kh x kw) matrix so that every direction in the filter bank moves alike.

    Before each step a bank is rescaled to Frobenius norm sqrt(out), which changes nothing the
    net computes because a BatchNorm follows every conv (``validate`` demands it); the update is
    scaled to about that norm too, so ``lr`` is the share of a bank's norm one step moves,
    independent of its shape, and no weight decay is needed to hold the norm. ``dtype`` is the
    orthogonalization's: a property of the machine, not of the run, so not in the state.

    The step launches little: momentum, rescaling and update are ``foreach`` ops over all the
    conv weights, and the weights are orthogonalized in a few batches (``_make_banks``) instead
    of one by one."""

    def __init__(self, params, dtype: torch.dtype = torch.bfloat16, **sgd):
        super().__init__(params, **sgd)
        self.dtype = dtype
        self._banks: dict[int, tuple[list[int], list[_Bank], torch.Tensor]] = {}  # by group: see _banks_of

    @torch.no_grad()
    def step(self, closure=None):
        for index, group in enumerate(self.param_groups):
            if "muon_momentum" in group:
                self._muon_step(index, group)
        return super().step(closure)

    def _muon_step(self, index: int, group: dict):
        params, banks, root_out = self._banks_of(index, group)
        if not params:
            return
        grads = [p.grad for p in params]
        buffers = [self._buffer(p) for p in params]
        momentum = group["muon_momentum"]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        directions = [v for bank in banks for v in bank.direction_views]
        torch._foreach_copy_(directions, grads)
        torch._foreach_add_(directions, buffers, alpha=momentum)  # Nesterov: gradient + momentum x buffer
        for bank in banks:
            bank.orthogonalize(self.dtype)
        scales = root_out / torch.stack(torch._foreach_norm(params)).clamp_(min=1e-12)
        torch._foreach_mul_(params, list(scales.unbind()))  # every bank to norm sqrt(out); all-zero stays zero
        torch._foreach_add_(params, [v for bank in banks for v in bank.update_views], alpha=-group["lr"])
        for p in params:  # stepped: torch's SGD below must leave them alone
            p.grad = None

    def _banks_of(self, index: int, group: dict) -> tuple[list[torch.Tensor], list[_Bank], torch.Tensor]:
        """(the group's weights that have gradients, in bank order; their banks; sqrt(out) of
        each, (k,) on their device), built again only when those weights change."""
        params = [p for p in group["params"] if p.grad is not None]
        key = sorted(map(id, params))
        if index not in self._banks or self._banks[index][0] != key:
            banks = _make_banks(params) if params else []
            ordered = [p for bank in banks for p in bank.params]
            root_out = torch.tensor([p.shape[0] ** 0.5 for p in ordered], device=params[0].device) if params else None
            self._banks[index] = (key, banks, root_out)
        _, banks, root_out = self._banks[index]
        return [p for bank in banks for p in bank.params], banks, root_out

    def _buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "muon_buffer" not in state:
            state["muon_buffer"] = torch.zeros_like(param)
        return state["muon_buffer"]


def _make_banks(params: list[torch.Tensor]) -> list[_Bank]:
    """The weights in batches for ``orthogonalize``, largest matrices first: a weight joins the
    cheapest bank whose slot holds its (short, long) matrix at no more than the device's
    ``PAD_COST`` times its own cost (short^2 x long multiply-adds a product), or at any cost
    where it is tiny; else it opens a bank. All-CNN-C's nine convs make three banks on a GPU,
    four on a CPU."""
    pad_cost = PAD_COST.get(params[0].device.type, 1)
    banks: list[tuple[tuple[int, int], list[torch.Tensor]]] = []
    for p in sorted(params, key=lambda p: _cost(_short_long(p)), reverse=True):
        shape = _short_long(p)
        homes = [(slot, members) for slot, members in banks if slot[0] >= shape[0] and slot[1] >= shape[1]
                 and (_cost(slot) <= pad_cost * _cost(shape) or _cost(shape) < TINY_COST)]
        home = min(homes, key=lambda bank: _cost(bank[0]))[1] if homes else None
        if home is None:
            banks.append((shape, [p]))
        else:
            home.append(p)
    return [_Bank(members) for _, members in banks]


# How many times its own cost a matrix's padded slot may cost, by device: on a GPU the step waits
# on launches, so (192, 864) joins (192, 1728) (not (192, 192)); a CPU pays for every multiply-add
# (padded, the fast recipe's step took 276 ms against 252-267 unpadded, on 2 AMX Xeon cores)
PAD_COST = {"cuda": 4}
TINY_COST = 2**20  # multiply-adds below which padding costs nothing that shows (the class conv's 10 x 192)


def _cost(shape: tuple[int, int]) -> int:
    return shape[0] ** 2 * shape[1]


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
