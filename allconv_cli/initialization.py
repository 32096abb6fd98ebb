"""How a run's convolutions start. The paper does not state its initialization.

- ``xavier``: Xavier-uniform weights, biases 0.1 (allconv 0.1's default). Xavier's variance,
  2 / (fan-in + fan-out), is half of what a ReLU layer needs to keep the signal's scale: on
  unit-variance input every conv of All-CNN-C outputs a variance of only 0.04-0.11 (measured,
  the 0.1 biases holding it there), so the gradients reaching the first layers are small.
- ``kaiming``: He et al. (2015): normal weights with variance 2 / fan-in, biases 0, which keeps
  the scale through each conv + ReLU (outputs of variance about 2 on unit-variance input).
- ``lsuv``: Mishkin & Matas (2016), layer-sequential unit variance: orthogonal weights, biases
  0, then, conv by conv in forward order, the weights are scaled until that conv's output has
  unit variance on a batch of the (preprocessed) training images.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHT_INITS = ("xavier", "kaiming", "lsuv")
LSUV_TOLERANCE = 0.05  # |variance - 1| accepted
LSUV_ROUNDS = 10


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def initialize(model: nn.Module, scheme: str, images: torch.Tensor | None = None):
    """Re-initialize every conv of ``model`` in place by ``scheme``, drawing from torch's global
    generator (the run's seed); ``lsuv`` needs ``images``, a float (B, C, H, W) batch as the model
    sees it (preprocessed). BatchNorm layers keep theirs."""
    from allconv_cli.models import _init_conv

    if scheme not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {scheme!r}: use one of {', '.join(WEIGHT_INITS)}")
    if scheme == "lsuv" and images is None:
        raise ValueError("the lsuv initialization needs a batch of training images")
    for conv in convs(model):
        if scheme == "xavier":
            _init_conv(conv)
            continue
        if scheme == "kaiming":
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        else:
            nn.init.orthogonal_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    if scheme == "lsuv":
        unit_variance(model, images)


class _Reached(Exception):
    """Raised by the hook once the conv being scaled has run: the rest of the forward is not needed."""


def unit_variance(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Scale each conv's weights, in forward order, until its output's variance on ``images`` is
    within LSUV_TOLERANCE of 1 -> the variances reached. Dropout is off meanwhile."""
    was_training = model.training
    model.eval()
    reached = []
    try:
        for conv in convs(model):
            seen = {}

            def stop(module, args, out):
                seen["variance"] = out.float().var().item()
                raise _Reached

            handle = conv.register_forward_hook(stop)
            try:
                with torch.no_grad():
                    for _ in range(LSUV_ROUNDS):
                        try:
                            model(images)
                        except _Reached:
                            pass
                        if abs(seen["variance"] - 1) < LSUV_TOLERANCE or seen["variance"] == 0:
                            break
                        conv.weight.div_(seen["variance"] ** 0.5)
            finally:
                handle.remove()
            reached.append(seen["variance"])
    finally:
        model.train(was_training)
    return reached
