"""How each built-in saliency method computes its maps: the functions the entries of
``methods.SALIENCY_METHODS`` name, each ``f(model, x, rows, layer) -> maps`` (see ``methods.Method``).

``backprop`` (the plain gradient), ``deconvnet`` and ``guided`` (guided backprop) are the paper's
backward rules at every ReLU (Section 3.4; ``rules``), started at each row's neuron or logit;
``gradcam`` (Selvaraju et al., 2017) weighs ``layer``'s maps by their mean gradient for a class;
``guided_gradcam`` multiplies the two. Maps are gradients with respect to the model's input, i.e.
after preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli.explain.rules import ReLURules, check_graph
from allconv_cli.explain.targets import Target, eval_mode, run_to

__all__ = ["backprop", "deconvnet", "gradcam", "guided", "guided_gradcam", "rule_map", "seed"]


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
