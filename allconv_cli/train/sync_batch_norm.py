"""BatchNorm over the global batch of every DDP process, on gloo (CPU) as on NCCL: what
``learner.make_learner`` turns a model's BatchNorm into under DDP."""

from __future__ import annotations

import torch
from torch import nn


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch of every DDP process: each process's per-channel count,
    mean and sum of squared deviations are gathered (differentiably, so gradients flow through
    the global statistics too) and combined (Chan et al.'s parallel variance). Unlike
    torch's ``nn.SyncBatchNorm`` (CUDA only), it runs on gloo (CPU) as on NCCL; evaluation and
    a single process use plain BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        flat = x.float()  # (B, C, H, W); statistics in fp32 under autocast too
        count = flat.numel() // flat.shape[1]
        mean = flat.mean((0, 2, 3))
        squares = (flat - mean[None, :, None, None]).square().sum((0, 2, 3))
        local = torch.stack([torch.full_like(mean, count), mean, squares])  # (3, C)
        # every rank's statistics, (world, 3, C): an all-gather as a sum of rows placed by rank
        # (gloo has no reduce-scatter or all-to-all for an all-gather's backward)
        rank = torch.distributed.get_rank()
        parts = _SumOverRanks.apply(torch.stack([local if r == rank else torch.zeros_like(local)
                                        for r in range(torch.distributed.get_world_size())]))
        counts, means = parts[:, 0], parts[:, 1]
        total = counts.sum(0)
        global_mean = (counts * means).sum(0) / total
        var = (parts[:, 2].sum(0) + (counts * (means - global_mean).square()).sum(0)) / total  # biased
        with torch.no_grad():  # running statistics as BatchNorm keeps them: unbiased variance
            self.num_batches_tracked += 1
            self.running_mean.lerp_(global_mean, self.momentum)
            self.running_var.lerp_(var * total / (total - 1), self.momentum)
        scale = self.weight * (var + self.eps).rsqrt()
        shift = self.bias - global_mean * scale
        return (flat * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over every DDP process, differentiable: the gradient of each
    process's copy is the sum of every process's gradient of the result."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


def sync_batch_norm(model: nn.Module):
    """Make every ``nn.BatchNorm2d`` of ``model`` a ``SyncBatchNorm`` in place, keeping its
    parameters and buffers (the same tensors: an optimizer over them still holds them)."""
    for module in list(model.modules()):
        if type(module) is nn.BatchNorm2d:  # affine, with running statistics and the run's momentum
            module.__class__ = SyncBatchNorm  # the same attributes and tensors; only forward changes
