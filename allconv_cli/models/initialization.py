"""How a run's convolutions start. The paper does not state its initialization.

- ``xavier-open`` (the default): ``xavier``, but the class conv's biases start at 1.0, so the
  paper's ReLU after the class conv passes every image at the start. With biases of 0.1 the
  class scores are nearly the same for every image at the start (the signal fades through eight
  ReLU layers), the first steps push them below zero and the ReLU stays shut (measured in
  docs/RESULTS.md: the run never leaves chance).
- ``xavier``: Xavier-uniform weights, biases 0.1 (allconv 0.1's default). Xavier's variance,
  2 / (fan-in + fan-out), is half of what a ReLU layer needs to keep the signal's scale: on
  unit-variance input every conv of All-CNN-C outputs a variance of only 0.04-0.11 (measured,
  the 0.1 biases holding it there), so the gradients reaching the first layers are small.
- ``caffe-xavier``: Caffe's ``xavier`` filler at its defaults, as the public Caffe reproduction
  that reached the paper's error used it on every conv (mateuszbuda/ALL-CNN,
  ``ALL_CNN_C_train_val.prototxt``: ``weight_filler { type: "xavier" }``, ``bias_filler { type:
  "constant" value: 0 }``): uniform on [-a, a] with a = sqrt(3 / fan-in), so variance 1 / fan-in
  (fan-in = in_channels x kh x kw; Caffe's ``variance_norm`` defaults to ``FAN_IN``), biases 0.
  Half of kaiming's; xavier's where a conv has as many outputs as inputs, but 16 times it for
  All-CNN-C's conv1 (fan-in 27, fan-out 864), whose weights then spread 4 times as wide.
- ``kaiming``: He et al. (2015): normal weights with variance 2 / fan-in, biases 0, which keeps
  the scale through each conv + ReLU (outputs of variance about 2 on unit-variance input).
- ``lsuv``: Mishkin & Matas (2016), layer-sequential unit variance: orthogonal weights, biases
  0, then, conv by conv in forward order, the weights are scaled until that conv's output has
  unit variance on a batch of the (preprocessed) training images.

Two options change single layers after that, for the fast recipe (Keller Jordan's airbench):

- ``whiten_first_conv``: the first conv's first filters become the whitening of the training
  images' k x k patches (each eigenvector of the patch covariance, scaled by
  1 / sqrt(eigenvalue + WHITEN_EPS), and its negative), so that the net starts from
  decorrelated, unit-variance edges and colours instead of random filters. A 3x3 conv on RGB
  holds all 27 components (54 filters of 96); a 5x5 conv (families A and B) has 75 components,
  more than 96 filters can hold in both signs, so it takes the 48 of largest variance (all 96
  filters) and drops the faintest, highest-frequency ones.
- ``dirac``: each later conv with at least as many outputs as inputs starts with its first
  ``in`` filters as the identity (``torch.nn.init.dirac_``), so that the deep stack starts close
  to passing its input through.
"""

from __future__ import annotations

import torch
from torch import nn

from allconv_cli.choices import WEIGHT_INITS
from allconv_cli.models.net import init_conv

CLASS_BIAS = 1.0  # xavier-open's class-conv bias: above the spread of the class scores at the start
WHITEN_EPS = 5e-4  # added to the eigenvalues (input units squared): limits the gain on the faintest patterns
WHITEN_IMAGES = 2_000  # training images whose patches give the covariance (2,000 x 900 3x3 patches for CIFAR)
WHITEN_CHUNK = 250  # images unfolded at a time: 250 x 784 5x5 RGB patches are 118 MB in float64
LSUV_TOLERANCE = 0.05  # |variance - 1| accepted
LSUV_ROUNDS = 10


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The conv that ``whiten_first_conv`` sets (and ``--whiten frozen`` keeps fixed)."""
    return convs(model)[0]


def initialize(model: nn.Module, scheme: str, images: torch.Tensor | None = None):
    """Re-initialize every conv of ``model`` in place by ``scheme``, drawing from torch's global
    generator (the run's seed); ``lsuv`` needs ``images``, a float (B, C, H, W) batch as the model
    sees it (preprocessed). BatchNorm layers keep theirs."""

    if scheme not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {scheme!r}: use one of {', '.join(WEIGHT_INITS)}")
    if scheme == "lsuv" and images is None:
        raise ValueError("the lsuv initialization needs a batch of training images")
    for conv in convs(model):
        if scheme in ("xavier", "xavier-open"):
            init_conv(conv)
            continue
        if scheme == "caffe-xavier":
            bound = (3 / conv.weight[0].numel()) ** 0.5  # weight[0]: (in / groups, kh, kw), Caffe's count / num
            nn.init.uniform_(conv.weight, -bound, bound)
        elif scheme == "kaiming":
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        else:
            nn.init.orthogonal_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    if scheme == "lsuv":
        unit_variance(model, images)
    head = convs(model)[-1]  # the class conv: the last conv of every All-CNN model
    if scheme == "xavier-open" and head.bias is not None:
        nn.init.constant_(head.bias, CLASS_BIAS)


def patch_whitening(images: torch.Tensor, kernel: int, components: int | None = None) -> torch.Tensor:
    """Float (N, C, H, W) images -> (2 m, C, k, k) filters: the eigenvectors of the covariance of
    their k x k patches (the ``components`` = m of largest eigenvalue; all C k^2 by default), in
    ascending order of eigenvalue, each divided by sqrt(eigenvalue + WHITEN_EPS), then the same
    filters negated (a ReLU after them keeps both signs of each pattern)."""
    dims = images.shape[1] * kernel * kernel
    components = dims if components is None else components
    if not 0 < components <= dims:
        raise ValueError(f"a {kernel}x{kernel} patch whitening has 1 to {dims} components, not {components}")
    # the covariance summed over chunks of images, in float64: 2,000 CIFAR images hold 1.6 M
    # 5x5 patches, 0.9 GB at once
    total, outer, count = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64), 0
    for chunk in images.split(WHITEN_CHUNK):
        patches = torch.nn.functional.unfold(chunk.double(), kernel)  # (n, C k^2, patches per image)
        patches = patches.transpose(1, 2).reshape(-1, dims)
        total, outer, count = total + patches.sum(0), outer + patches.T @ patches, count + len(patches)
    mean = total / count
    covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)  # (C k^2, C k^2), about the mean
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues[-components:], eigenvectors[:, -components:]
    filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + WHITEN_EPS).sqrt()[:, None])
    filters = filters.reshape(-1, images.shape[1], kernel, kernel).float()
    return torch.cat([filters, -filters])


def whiten_first_conv(model: nn.Module, images: torch.Tensor):
    """Set the first conv's first filters to ``patch_whitening`` of ``images`` (float (N, C, H, W),
    preprocessed as the model sees them), biases 0: as many components as the conv holds in both
    signs (54 of All-CNN-C's 96 filters; all 96 of a 5x5 conv on RGB, its 48 strongest of 75)."""
    first = first_conv(model)
    kernel = first.kernel_size[0]
    if first.out_channels < 2:
        raise ValueError(f"the first conv has {first.out_channels} filter: a whitening needs 2: train without --whiten")
    components = min(first.in_channels * kernel * kernel, first.out_channels // 2)
    filters = patch_whitening(images, kernel, components)
    with torch.no_grad():
        first.weight[: len(filters)] = filters.to(first.weight)
        if first.bias is not None:
            first.bias[: len(filters)] = 0


def dirac(model: nn.Module):
    """Start every conv after the first, but for the class conv, with its first ``in_channels``
    filters as the identity (where it has that many outputs)."""
    with torch.no_grad():
        for conv in convs(model)[1:-1]:
            if conv.out_channels >= conv.in_channels:
                nn.init.dirac_(conv.weight[: conv.in_channels])


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
