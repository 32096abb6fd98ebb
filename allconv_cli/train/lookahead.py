"""airbench's lookahead: a slow copy of the model that training is pulled toward every few steps."""

from __future__ import annotations

import torch
from torch import nn


class Lookahead:
    """airbench's lookahead (from hlb-cifar10): a slow copy of the model's floating-point state
    (weights, BatchNorm statistics). Every ``EVERY`` steps, and at the run's last, the copy moves
    toward the trained state by 1 - rho and training goes on from the copy. rho = decay^EVERY x
    progress^3 rises from 0: early steps run free, the last ones are averaged."""

    EVERY = 5

    def __init__(self, model: nn.Module, decay: float, steps_per_epoch: int, total_steps: int):
        self.decay, self.steps_per_epoch, self.total_steps = decay, steps_per_epoch, total_steps
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int, step: int):
        done = epoch * self.steps_per_epoch + step + 1  # steps taken in the run
        if done % self.EVERY and done != self.total_steps:
            return
        rho = self.decay ** self.EVERY * (done / self.total_steps) ** 3
        trained = model.state_dict()  # shares storage with the model: copying into it moves the model
        slow, fast = list(self.slow.values()), [trained[name] for name in self.slow]
        torch._foreach_lerp_(slow, fast, 1 - rho)  # two launches (per dtype) for all the tensors
        torch._foreach_copy_(fast, slow)

    def state_dict(self) -> dict:
        return self.slow

    def load_state_dict(self, state: dict):
        for name, slow in self.slow.items():
            slow.copy_(state[name])
