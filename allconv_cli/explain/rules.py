"""The paper's three backward rules at every ReLU, applied by a ``TorchFunctionMode``.

Section 3.4 of the paper: with f the input of a ReLU in the forward pass and R the signal
coming down from above, the methods differ only at each ReLU:

- ``backprop`` (the plain gradient): R_below = (f > 0) * R
- ``deconvnet``:                     R_below = (R > 0) * R
- ``guided`` (guided backprop):      R_below = (f > 0) * (R > 0) * R

Everything else (convolutions, pooling, averaging) is backpropagated normally. The rules are
applied at every ReLU of the model however it is called (``nn.ReLU``, ``nn.ReLU(inplace=True)``,
``F.relu``, ``torch.relu(_)``, ``x.relu(_)``, ``F.threshold(x, 0, 0)``) by ``ReLURules``, a
mode that is active only during the forward pass of a saliency call: the model itself is never
modified. ``check_graph`` then walks the autograd graph: a ReLU that escaped the mode (called
through ``torch.ops``) or another activation (GELU, SiLU, sigmoid, tanh, ...), which the
paper's rules do not cover, makes ``deconvnet`` and ``guided`` refuse the model.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["RULES", "ReLURules", "check_graph"]

RULES = ("backprop", "deconvnet", "guided")  # the paper's backward rules at every ReLU (Section 3.4)


class _ReLURule(torch.autograd.Function):
    """ReLU forward; backward by one of the paper's rules instead of the plain gradient."""

    @staticmethod
    def forward(ctx, f, rule, inplace):
        ctx.rule = rule
        ctx.save_for_backward(f > 0)  # bool mask, before an in-place ReLU overwrites f
        if inplace:
            ctx.mark_dirty(f)
            return f.relu_()
        return f.relu()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, r):
        (f_positive,) = ctx.saved_tensors
        if ctx.rule == "backprop":
            keep = f_positive
        elif ctx.rule == "deconvnet":
            keep = r > 0
        else:  # guided
            keep = f_positive & (r > 0)
        return torch.where(keep, r, 0), None, None


_RELU = {torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_}


def _as_relu(func, args, kwargs) -> tuple[torch.Tensor, bool] | None:
    """(input, inplace) if this call is a ReLU, else None."""
    if func in _RELU or func in _RELU_INPLACE:
        return args[0], func in _RELU_INPLACE
    if func is F.relu:  # F.relu(input, inplace=False); nn.ReLU calls this
        return args[0], bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
    if func in (F.threshold, torch.threshold, torch.threshold_):  # (input, threshold, value[, inplace])
        params = list(args[1:]) + [kwargs[k] for k in ("threshold", "value", "inplace") if k in kwargs]
        if len(params) >= 2 and params[0] == 0 and params[1] == 0:
            inplace = func is torch.threshold_ or (len(params) > 2 and bool(params[2]))
            return args[0], inplace
    return None


class ReLURules(TorchFunctionMode):
    """While active, every ReLU call runs with ``rule``'s backward; all else is unchanged."""

    def __init__(self, rule: str):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        relu = _as_relu(func, args, kwargs)
        if relu is not None:
            return _ReLURule.apply(relu[0], self.rule, relu[1])
        return func(*args, **kwargs)


# Autograd nodes of ReLUs that bypassed the mode (e.g. called through torch.ops), and of
# activations the paper's rules do not cover.
_ESCAPED_RELU = re.compile(r"^(Relu|Threshold)Backward\d+$")
_OTHER_ACTIVATION = re.compile(
    r"^(Gelu|Silu|Elu|Selu|Celu|LeakyRelu|RreluWithNoise|PreluKernel|Hardtanh|Hardswish|"
    r"Hardsigmoid|Sigmoid|LogSigmoid|Tanh|Softplus|Mish|Glu)Backward\d+$"
)


def check_graph(root: torch.Tensor, method: str, model: nn.Module):
    """Refuse a graph where ``method``'s rule would not be applied at every nonlinearity."""
    seen, stack = set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if _ESCAPED_RELU.match(name):
            raise ValueError(f"{type(model).__name__} applies a ReLU that the {method} rule cannot "
                             f"reach ({name}: called through torch.ops or C++); use --methods backprop")
        if _OTHER_ACTIVATION.match(name):
            act = _OTHER_ACTIVATION.match(name).group(1)
            raise ValueError(f"{type(model).__name__} uses {act}, not a ReLU: the paper's deconvnet and "
                             "guided rules are defined at ReLUs only; use --methods backprop,gradcam "
                             "for this model")
        stack.extend(next_node for next_node, _ in node.next_functions)
