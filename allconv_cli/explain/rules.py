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

Beside them, the rules of layer-wise relevance propagation (``LRPRules``, below), the same kind of
backward rule at every conv, ReLU and global average.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.fx.proxy import TraceError
from torch.overrides import TorchFunctionMode

__all__ = ["LRP_RULES", "LRPRules", "RULES", "ReLURules", "check_graph", "fold_batchnorm"]

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
            raise ValueError(f"{type(model).__name__} uses {act}, not a ReLU: the {method} rule is defined at "
                             "ReLUs only (as the paper's deconvnet and guided rules); use --methods "
                             "backprop,gradcam for this model")
        stack.extend(next_node for next_node, _ in node.next_functions)


# Layer-wise relevance propagation (Bach et al., 2015), beside the paper's rules: the same kind of
# backward rule, here at every conv (or linear layer), ReLU and global average. The signal going
# down is relevance R, not a gradient; with x a layer's input and z = W x + b its output:
#
# - epsilon at a conv:  R_below = x * W^T (R / (z + eps sign z))         (sign 0 = +1, as zennit's)
# - zplus at a conv:    R_below = x+ * W+^T s + x- * W-^T s,  s = R / (z+ + z- + eps),
#                       z+ = W+ x+ + b+ and z- = W- x- (W+ = max(W, 0), ...): alpha 1, beta 0
# - a ReLU:             R_below = R (the relevance of a closed unit is already 0)
# - the global average: R_below = x / (H W) * R / (mean + eps), each position by its share
#
# ``LRPRules`` applies them as ``ReLURules`` applies the paper's rules, to every ReLU however it is
# called. A BatchNorm is a linear map the rules do not see: ``maps.lrp`` folds each one into the
# conv before it first (``fold_batchnorm``, as zennit's BatchNorm canonizers merge them); one left
# over is refused.
LRP_RULES = ("epsilon", "zplus")


def _stabilized(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z moved away from 0 by epsilon, in the direction of its sign (+ for 0)."""
    return z + ((z == 0).to(z) + z.sign()) * epsilon


class _LinearLRP(torch.autograd.Function):
    """A conv or linear layer ``op(x, weight, bias)`` forward; backward by an LRP rule."""

    @staticmethod
    def forward(ctx, x, weight, bias, op, rule, epsilon):
        ctx.save_for_backward(x, weight, bias)
        ctx.op, ctx.rule, ctx.epsilon = op, rule, epsilon
        return op(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, r):
        x, weight, bias = ctx.saved_tensors
        if ctx.rule == "epsilon":
            parts = [(x, weight, bias)]
        else:  # zplus: positive inputs through positive weights, negative through negative
            parts = [(x.clamp(min=0), weight.clamp(min=0), None if bias is None else bias.clamp(min=0)),
                     (x.clamp(max=0), weight.clamp(max=0), None)]
        with torch.enable_grad():
            inputs = [part[0].detach().requires_grad_(True) for part in parts]
            z = sum(ctx.op(i, w, b) for i, (_, w, b) in zip(inputs, parts))
            grads = torch.autograd.grad(z, inputs, r / _stabilized(z.detach(), ctx.epsilon))
        return sum(i.detach() * g for i, g in zip(inputs, grads)), None, None, None, None, None


class _PassLRP(torch.autograd.Function):
    """ReLU forward; relevance passes through unchanged."""

    @staticmethod
    def forward(ctx, f, inplace):
        if inplace:
            ctx.mark_dirty(f)
            return f.relu_()
        return f.relu()

    @staticmethod
    def backward(ctx, r):
        return r, None


class _AverageLRP(torch.autograd.Function):
    """The mean over ``dims`` forward; backward shares relevance by each position's contribution."""

    @staticmethod
    def forward(ctx, x, dims, keepdim, epsilon):
        z = x.mean(dims, keepdim=True)
        ctx.save_for_backward(x, z)
        ctx.count, ctx.epsilon = x[0].numel() // z[0].numel(), epsilon
        return z if keepdim else z.squeeze(dims)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, r):
        x, z = ctx.saved_tensors
        r = r.reshape(z.shape)
        return x * (r / _stabilized(z, ctx.epsilon)) / ctx.count, None, None, None


# Additions of two computed tensors (a residual connection), which LRP would need a rule for.
_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
         torch.Tensor.__iadd__}


def _global_dims(func, args, kwargs) -> tuple[int, ...] | None:
    """The spatial dims if this call is a mean over all of them (a global average), else None."""
    if func is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return (2, 3) if size in (1, (1, 1), [1, 1]) else None
    if func not in (torch.mean, torch.Tensor.mean) or args[0].dim() != 4:
        return None
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    return (2, 3) if sorted(d % 4 for d in dims) == [2, 3] else None


class LRPRules(TorchFunctionMode):
    """While active, every conv, linear layer, ReLU and global average runs with the LRP ``rule``'s
    backward (see above); a BatchNorm is refused; all else is unchanged."""

    def __init__(self, rule: str, epsilon: float):
        super().__init__()
        if rule not in LRP_RULES:
            raise ValueError(f"unknown LRP rule {rule!r}; choose from {', '.join(LRP_RULES)}")
        self.rule, self.epsilon = rule, epsilon

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear):
            x, weight, bias, *rest = (*args, *[None] * (3 - len(args)))
            bias = kwargs.pop("bias", bias)

            def op(i, w, b):
                return func(i, w, b, *rest, **kwargs)

            return _LinearLRP.apply(x, weight, bias, op, self.rule, self.epsilon)
        relu = _as_relu(func, args, kwargs)
        if relu is not None:
            return _PassLRP.apply(*relu)
        dims = _global_dims(func, args, kwargs)
        if dims is not None:
            keepdim = func is F.adaptive_avg_pool2d or bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            return _AverageLRP.apply(args[0], dims, keepdim, self.epsilon)
        if func in _ADDS and len(args) > 1 and all(isinstance(a, torch.Tensor) and a.requires_grad for a in args[:2]):
            raise ValueError("lrp: the model adds two branches (a residual connection), and the rules here cover "
                             "convs, ReLUs and the global average only; the gradient there would count relevance "
                             "twice: choose another method for this model")
        if func is F.batch_norm:
            raise ValueError("lrp: a BatchNorm that could not be folded into the conv before it (torch.fx could "
                             "not trace the model, or the BatchNorm follows no conv); LRP's rules do not cover it")
        return func(*args, **kwargs)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the conv before it (torch.fx);
    a model torch.fx cannot trace is copied as it is."""
    plain = copy.deepcopy(model).eval()
    try:
        return fuse(plain)
    except (TraceError, TypeError, RuntimeError, NotImplementedError, AttributeError):  # how fx tracing fails
        return plain
