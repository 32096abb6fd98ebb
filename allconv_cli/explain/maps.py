"""How each built-in saliency method computes its maps: the functions the entries of
``methods.SALIENCY_METHODS`` name, each ``f(model, x, rows, layer) -> maps`` (see ``methods.Method``).

``backprop`` (the plain gradient), ``deconvnet`` and ``guided`` (guided backprop) are the paper's
backward rules at every ReLU (Section 3.4; ``rules``), started at each row's neuron or logit;
``gradcam`` (Selvaraju et al., 2017) weighs ``layer``'s maps by their mean gradient for a class;
``guided_gradcam`` multiplies the two. Beyond them, the methods people compare them with:
``input_x_gradient``, ``integrated_gradients``, ``smoothgrad`` (over any gradient method),
``occlusion`` and ``lrp`` (layer-wise relevance propagation, whose backward rules live beside the
paper's in ``rules``). Maps are with respect to the model's input, i.e. after preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli.explain.methods import SALIENCY_METHODS
from allconv_cli.explain.perturbation import baseline_inputs
from allconv_cli.explain.rules import LRPRules, ReLURules, check_graph, fold_batchnorm
from allconv_cli.explain.targets import Target, eval_mode, run_to

_PASS_ROWS = 256  # images per forward/backward pass of the path, noise and occlusion methods

__all__ = ["backprop", "completeness", "deconvnet", "gradcam", "guided", "guided_gradcam", "input_x_gradient",
           "integrated_gradients", "lrp", "occlusion", "path_start", "rule_map", "seed", "smoothgrad"]


def seed(root: torch.Tensor, rows: Sequence[Target]) -> torch.Tensor:
    """The starting signal: 1 at each row's neuron (or logit), 0 elsewhere; shaped like root."""
    start = torch.zeros_like(root)
    for i, t in enumerate(rows):
        if t.layer is None:
            start[i, t.channel] = 1
        else:
            start[i, t.channel, t.y, t.x] = 1
    return start


def rule_map(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], rule: str) -> torch.Tensor:
    """The signal of each row's neuron or logit brought down to the input by ``rule`` (one of
    ``rules.RULES``) at every ReLU: (N, C, H, W)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), eval_mode(model):
        with ReLURules(rule):
            act, logits = run_to(model, x, rows[0].layer, through=False)
        root = logits if act is None else act
        if rule != "backprop":  # the plain gradient is right whatever the nonlinearity
            check_graph(root, rule, model)
        (grad,) = torch.autograd.grad(root, x, seed(root, rows))
    return grad


def backprop(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str | None = None) -> torch.Tensor:
    """The plain gradient (N, C, H, W); right for any model."""
    return rule_map(model, x, rows, "backprop")


def deconvnet(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str | None = None) -> torch.Tensor:
    """Zeiler and Fergus's deconvnet rule at every ReLU (N, C, H, W); ReLU models only."""
    return rule_map(model, x, rows, "deconvnet")


def guided(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str | None = None) -> torch.Tensor:
    """Guided backprop (N, C, H, W): the gradient and the deconvnet's rule at once; ReLU models only."""
    return rule_map(model, x, rows, "guided")


def gradcam(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str) -> torch.Tensor:
    """Grad-CAM for class rows (N, 1, H, W): the ReLU of ``layer``'s maps weighted by their
    spatially averaged gradient, bilinearly upsampled to the input."""
    with torch.enable_grad(), eval_mode(model):
        act, logits = run_to(model, x.detach(), layer)  # act (N, K, h, w)
        (grad,) = torch.autograd.grad(logits, act, seed(logits, rows))
    weights = grad.mean((2, 3), keepdim=True)  # (N, K, 1, 1): each map's importance for the class
    cam = (weights * act.detach()).sum(1, keepdim=True).relu()  # (N, 1, h, w)
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)


def guided_gradcam(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str) -> torch.Tensor:
    """Guided backprop times Grad-CAM (N, C, H, W): sharp and class-dependent."""
    return guided(model, x, rows) * gradcam(model, x, rows, layer)  # (N, 1, H, W) broadcasts over channels


def _values(model: nn.Module, x: torch.Tensor, rows: Sequence[Target]) -> torch.Tensor:
    """Each row's neuron activation or class logit on ``x`` (N,), without gradients."""
    with torch.no_grad(), eval_mode(model):
        act, logits = run_to(model, x, rows[0].layer, through=False)
    root = logits if act is None else act
    return (root * seed(root, rows)).flatten(1).sum(1)


def _in_passes(copies: int, rows: Sequence[Target], variant, compute) -> torch.Tensor:
    """``compute(batch, its rows)`` over ``copies`` variants of the batch of ``rows``' images, made
    by ``variant(first, count)`` -> (count, N, C, H, W) a chunk at a time, so that a pass holds at
    most _PASS_ROWS images: -> (copies, N, ...)."""
    n = len(rows)
    chunk = max(1, _PASS_ROWS // n)
    parts = []
    for first in range(0, copies, chunk):
        count = min(chunk, copies - first)
        parts.append(compute(variant(first, count).flatten(0, 1), list(rows) * count).unflatten(0, (count, n)))
    return torch.cat(parts)


def input_x_gradient(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str | None = None):
    """The input times its gradient (Shrikumar et al., 2016), (N, C, H, W)."""
    return x * backprop(model, x, rows)


def path_start(x: torch.Tensor, baseline: str, black: torch.Tensor) -> torch.Tensor:
    """Where integrated gradients' path starts (``baseline``: black, blur or mean), shaped like x."""
    if baseline == "black":
        return black.expand_as(x)
    if baseline == "blur":
        return baseline_inputs(x, "blur")
    return torch.zeros_like(x)  # mean: 0 in the model's input


def integrated_gradients(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str | None = None, *,
                         steps: int, baseline: str, black: torch.Tensor) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al., 2017), (N, C, H, W): (x - x') times the mean
    gradient at x' + k/steps (x - x'), k = 1..steps (the right Riemann sum of their Eq. 3, as
    captum's riemann_right), from the baseline x' (``path_start``)."""
    start = path_start(x, baseline, black)
    alphas = torch.arange(1, steps + 1, device=x.device, dtype=x.dtype) / steps

    def path(first, count):
        return start + alphas[first:first + count].view(-1, 1, 1, 1, 1) * (x - start)

    gradients = _in_passes(steps, rows, path, lambda batch, repeated: backprop(model, batch, repeated))
    return (x - start) * gradients.mean(0)


def completeness(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], maps: torch.Tensor,
                 layer: str | None = None, *, steps: int, baseline: str, black: torch.Tensor) -> dict:
    """How far integrated gradients' maps are from summing to the change of the target from the
    baseline to the image (their completeness axiom): that change, and |sum - change|, each (N,)."""
    change = _values(model, x, rows) - _values(model, path_start(x, baseline, black), rows)
    return {"baseline_to_image": change, "completeness_error": (maps.flatten(1).sum(1) - change).abs()}


def smoothgrad(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str | None = None, *,
               of: str, samples: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """SmoothGrad (Smilkov et al., 2017), (N, C, H, W): the mean of method ``of``'s maps over
    ``samples`` copies of x plus Gaussian noise of std ``noise`` times each image's range
    (max - min); the noise of copy k is the k-th (N, C, H, W) draw from ``generator``."""
    wrapped = SALIENCY_METHODS[of].function()
    sigma = noise * (x.amax((1, 2, 3)) - x.amin((1, 2, 3))).view(-1, 1, 1, 1)

    def noisy(first, count):  # drawn in order, copy by copy, as the passes ask for them
        return x + torch.stack([torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                                for _ in range(count)]) * sigma

    return _in_passes(samples, rows, noisy, lambda batch, repeated: wrapped(model, batch, repeated, None)).mean(0)


def _window_starts(side: int, window: int, stride: int) -> list[int]:
    """Where occlusion's windows start along a side, as captum's: the last may run past the edge."""
    return [k * stride for k in range(math.ceil((side - window) / stride) + 1)]


def occlusion(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str | None = None, *,
              window: int, stride: int) -> torch.Tensor:
    """Occlusion (Zeiler and Fergus, 2014), (N, C, H, W), each colour channel alike: at each
    pixel, the mean drop of the target when a ``window`` x ``window`` square over it is set to 0
    in the model's input (every ``stride`` px, as captum's ``Occlusion``)."""
    height, width = x.shape[2:]
    if window > min(height, width):
        raise ValueError(f"--occlusion-window {window}: give at most {min(height, width)}, the input's side")
    if stride > window:
        raise ValueError(f"--occlusion-stride {stride}: give at most the window, {window}, so that every pixel "
                         "is occluded")
    ys, xs = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    masks = torch.stack([(((ys >= top) & (ys < top + window))[:, None] & ((xs >= left) & (xs < left + window))[None])
                         for top in _window_starts(height, window, stride)
                         for left in _window_starts(width, window, stride)]).to(x.dtype)  # (P, H, W)
    reference = _values(model, x, rows)

    def occluded(first, count):
        return x * (1 - masks[first:first + count, None, None])

    drops = reference - _in_passes(len(masks), rows, occluded,
                                   lambda batch, repeated: _values(model, batch, repeated))  # (P, N)
    total = (drops[:, :, None, None] * masks[:, None]).sum(0)  # (N, H, W)
    return (total / masks.sum(0)).unsqueeze(1).expand_as(x).contiguous()


def lrp(model: nn.Module, x: torch.Tensor, rows: Sequence[Target], layer: str | None = None, *,
        rule: str, epsilon: float) -> torch.Tensor:
    """Layer-wise relevance propagation (Bach et al., 2015) of each row's class logit, (N, C, H, W):
    the logit's value taken down to the input by ``rule`` (``rules.LRPRules``) at every conv, ReLU
    and global average, each BatchNorm folded into the conv before it; the map sums to the logit
    but for what the biases and the epsilons absorb."""
    folded = fold_batchnorm(model)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with LRPRules(rule, epsilon):
            logits = folded(x)
        check_graph(logits, "lrp", model)
        (relevance,) = torch.autograd.grad(logits, x, seed(logits, rows) * logits.detach())
    return relevance
