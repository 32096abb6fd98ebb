"""Speed of a network's training step, inference and data path, in the spirit of timm's
``benchmark.py``: warm-up steps, then timed steps between two device synchronizations.

- ``train``: the trainer's own step, ``train.train_step``, on uint8 batches from
  ``Batches`` (held in memory on the device): augmentation, /255, standardization,
  memory format, autocast forward, loss, backward, optimizer, schedule, lookahead and EMA, with
  the recipe's settings (a preset's, else the trainer's defaults). The loop's bookkeeping
  (running sums, a check every 10 steps) is not timed. Then five steps in a row are run once
  more under a ``TorchDispatchMode`` that counts the aten ops they dispatch (``ops_per_step``,
  views apart): on a GPU each launches at least one kernel, so the count says how launch-bound
  a step is.
- ``infer``: the network alone in eval mode under ``torch.inference_mode`` on one fixed,
  already standardized batch (what timm's inference benchmark times).
- ``data``: the data path alone: batch, augmentation and standardization, on the device.

Data is synthetic, so a benchmark runs offline anywhere: uniform random uint8 images of the
network's input size, as many as CIFAR's training split (50,000) but at most 256 MiB of them
(1,783 images at 224x224), with uniform random labels.

FLOPs are counted, not looked up: forward hooks read each convolution's output shape, and a
convolution costs 2 x MACs = 2 x (output elements) x (input channels / groups) x kernel area.
Biases, ReLUs, pooling, dropout and the global average (about 0.1 % of All-CNN-C's work) are
not counted. A training step adds the backward pass: 2 x MACs for the weight gradient of every
conv with trainable weights, 2 x MACs for the input gradient of every conv whose input needs
one (not the first conv's), so it costs just under 3 x the forward. All-CNN-C on 32x32:
0.5416 GFLOP forward, 1.6195 GFLOP per trained image.

The achievable rate is measured too, in the same process and precision: a large square matmul
(the densest work the device does), so "% of matmul" says how close the network runs to what
this machine reaches, where a vendor peak is unknown (most CPUs).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from allconv_cli.cpu_threads import BUSY_MARGIN, OthersUse, usable_cores, use_threads
from allconv_cli.data import splits
from allconv_cli.data.batches import Batches
from allconv_cli.data.preprocess import Standardize
from allconv_cli.device import (
    AUTOCAST_DTYPES,
    autocast,
    cpu_bf16_kernels,
    resolve_device,
    resolve_precision,
    tune_cpu_allocator,
)
from allconv_cli.models.registry import default_config, resolve_name
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.learner import Lookahead, make_learner, make_model, memory_format, place_model
from allconv_cli.train.step import batch_inputs, train_step

MODES = ("train", "infer", "data", "all")
SYNTHETIC_IMAGES = 50_000  # CIFAR-10's training split
SYNTHETIC_BYTES = 2**28  # 256 MiB of uint8 pixels at most, for large inputs
DEFAULT_STEPS = {"cpu": 20, "cuda": 200}  # timed steps: a CPU step takes ~1 s, a GPU step ~1 ms
MAX_STEPS = 100_000  # of --steps or --warmup: over a day of CPU steps, minutes of GPU steps
DEFAULT_WARMUP = {"cpu": 5, "cuda": 50}
MATMUL_SIZE = {"cpu": 4096, "cuda": 8192}  # n of the n x n matmul that measures the achievable rate

# Peak dense TFLOP/s of one GPU (no 2:4 sparsity; NVIDIA's datasheets print sparse tensor-core
# figures, twice these). fp32 runs on the CUDA cores; tf32, bf16 and fp16 on the tensor cores,
# fp16 at bf16's rate on these GPUs. Keys are matched against torch.cuda.get_device_name() in
# this order, most specific first.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    r"\bH200 NVL\b": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    r"\bH200\b": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    r"\bH100 NVL\b": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    r"\bH100 PCIe\b": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    r"\bH100\b": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM5, "NVIDIA H100 80GB HBM3"
    r"\bA100\b": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe alike
}


def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    """FLOPs per image of the convolutions: ``forward`` and ``train`` (forward + backward).

    One forward pass of a single image with hooks on every ``nn.Conv2d`` reads the layer
    shapes; whether a conv's input needs a gradient decides whether the backward computes one.
    """
    counts = {"forward": 0, "train": 0}

    def hook(conv: nn.Conv2d, inputs, output):
        kernel_area = conv.kernel_size[0] * conv.kernel_size[1]
        macs = output[0].numel() * (conv.in_channels // conv.groups) * kernel_area  # of image 0
        counts["forward"] += 2 * macs
        counts["train"] += 2 * macs * (1 + conv.weight.requires_grad + inputs[0].requires_grad)

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counts


def arithmetic(device: torch.device, precision: str) -> str:
    """The arithmetic the convolutions run in, for the peak table: a resolved precision, or
    tf32 where cuDNN may use it for fp32 on CUDA (torch's default)."""
    if device.type == "cuda" and precision == "fp32" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return precision


def matmul_tflops(device: torch.device, arithmetic: str, seconds: float = 1.0) -> float:
    """TFLOP/s of square matmuls in ``arithmetic`` (see ``arithmetic``) on ``device`` (2 n^3
    FLOPs each), timed for about ``seconds`` (and at least two calls) after one untimed call, at
    ``MATMUL_SIZE``: sizes at which the BLAS runs at its best rate. tf32 matmuls are allowed
    exactly when the convolutions run in tf32 (cuDNN's default for fp32, while torch keeps fp32
    matmuls in IEEE fp32 by default), so the two are compared in the same arithmetic."""
    n = MATMUL_SIZE["cuda" if device.type == "cuda" else "cpu"]
    dtype = AUTOCAST_DTYPES.get(arithmetic, torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator, device=device).to(dtype) for _ in range(2))
    calls = 0
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = arithmetic == "tf32"
    try:
        a @ b
        _sync(device)
        start = time.perf_counter()
        while calls < 2 or time.perf_counter() - start < seconds:
            a @ b
            calls += 1
            _sync(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return calls * 2 * n**3 / (time.perf_counter() - start) / 1e12


def kernel_path(device: torch.device, precision: str) -> str:
    """Which convolution kernels run in ``precision``: cuDNN on CUDA; on the CPU oneDNN at the
    CPU's capability, with the native bf16 kernels (AMX, AVX-512 BF16) that bf16 uses, or torch's own."""
    if device.type == "cuda":
        return f"cuDNN {torch.backends.cudnn.version()}"
    if not torch.backends.mkldnn.is_available():
        return "ATen (no oneDNN)"
    native = [name for name, present in cpu_bf16_kernels().items() if present] if precision == "bf16" else []
    return f"oneDNN, {torch.backends.cpu.get_cpu_capability()}" + (f" + {' + '.join(native)}" if native else "")


def peak_tflops(device: torch.device, arithmetic: str) -> float | None:
    """The device's peak dense TFLOP/s in ``arithmetic`` where the table knows it; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(arithmetic) for pattern, peaks in PEAK_TFLOPS.items() if re.search(pattern, name)), None)


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """CPUs this process may run on (a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def reset_peak_rss() -> bool:
    """Restart the peak resident set size (Linux: /proc/self/clear_refs); False where the
    peak can only be read since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB: Linux's VmHWM, which ``reset_peak_rss``
    restarts; elsewhere ru_maxrss since the process started (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def synthetic_data(input_size: tuple[int, int, int], num_classes: int, batch_size: int,
                   device: torch.device, seed: int = 0) -> splits.ImageData:
    """Uniform random uint8 images (N, C, H, W) and labels on ``device``: 50,000 images, or as
    many as fit in 256 MiB (at least one batch)."""
    count = max(batch_size, min(SYNTHETIC_IMAGES, SYNTHETIC_BYTES // math.prod(input_size)))
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (count, *input_size), generator=generator, device=device, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (count,), generator=generator, device=device)
    return splits.ImageData(images, labels, [str(i) for i in range(num_classes)])


def resolve_steps(device: torch.device, steps: int | None, warmup: int | None) -> tuple[int, int]:
    """(timed steps, warm-up steps): the device type's defaults where None."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    return (DEFAULT_STEPS[kind] if steps is None else steps,
            DEFAULT_WARMUP[kind] if warmup is None else warmup)


def timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device,
          begin: Callable[[], None] | None = None) -> float:
    """Seconds that ``steps`` calls of ``step`` take after ``warmup`` untimed ones, measured
    between device synchronizations (CUDA runs asynchronously); ``begin()`` runs between the two."""
    for _ in range(warmup):
        step()
    _sync(device)
    if begin is not None:
        begin()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


def busy_cores(free: float | None, cores: int, results: dict) -> float | None:
    """The most cores other processes kept busy: just before the run (``free`` of ``cores``
    sampled for the thread choice) or while a mode was timed; None where not measured."""
    seen = [row["others_cores"] for row in results.values() if row["others_cores"] is not None]
    if free is not None:
        seen.append(cores - free)
    return max(seen, default=None)


def is_idle(busy: float | None) -> bool | None:
    """Whether others' use of the cores stayed under ``BUSY_MARGIN`` of one; None: unknown."""
    return None if busy is None else busy < BUSY_MARGIN


def run(config: TrainConfig, mode: str = "all", steps: int | None = None, warmup: int | None = None,
        threads: int | None = None, speed_only: bool = False) -> dict:
    """Benchmark ``mode`` (train | infer | data | all) of the recipe ``config`` (its model, batch
    size, device, precision, memory format, compile and, in train mode, its whole step: optimizer,
    lookahead, EMA, augmentation) with ``threads`` CPU threads (None: one per free core, as the
    trainer picks them) -> settings and one result per mode: images/s, step time (ms), GFLOP per
    image, achieved TFLOP/s, share of the device's peak (None where unknown), peak memory, the
    cores other processes kept busy while it was timed and, in train mode, the aten ops one step
    dispatches (``speed_only``: the timed steps alone)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    for name, value, least in (("--steps", steps, 1), ("--warmup", warmup, 0)):
        if value is not None and not least <= value <= MAX_STEPS:
            raise ValueError(f"{name} must be from {least} to {MAX_STEPS:,}, got {value}")
    name = resolve_name(config.model)
    dev = resolve_device(config.device)
    steps, warmup = resolve_steps(dev, steps, warmup)
    choice = use_threads(threads)
    net = place_model(make_model(config, default_config(name)["num_classes"]), config, dev)
    input_size = tuple(net.pretrained_cfg["input_size"])
    flops = count_flops(net, input_size)
    prep = Standardize(net.pretrained_cfg["mean"], net.pretrained_cfg["std"]).to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer sets it; tuning falls in the warm-up
    else:
        tune_cpu_allocator()  # as the trainer does
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, dev))
    peak = peak_tflops(dev, arithmetic(dev, config.precision))
    matmul = None if speed_only else matmul_tflops(dev, arithmetic(dev, config.precision))
    step_model = torch.compile(net) if config.compile else net
    bench = _Bench(dev, config.batch_size, steps, warmup, peak, matmul)
    results = bench.modes(("data", "infer", "train") if mode == "all" else (mode,), config, net, step_model, prep,
                          flops, count_ops=not speed_only)
    busy = busy_cores(choice.free, choice.cores, results)
    return {
        "model": name.replace("_", "-"),
        "preset": config.preset,
        "device": str(dev),
        "device_name": device_name(dev),
        "cpus": cpu_count(),
        "threads": torch.get_num_threads(),
        "thread_choice": choice.record(),
        "busy_cores": busy,
        "machine_idle": is_idle(busy),
        "torch": torch.__version__,
        "precision": arithmetic(dev, config.precision),
        "kernels": kernel_path(dev, config.precision),
        "matmul_tflops": matmul,
        "channels_last": config.channels_last,
        "compile": config.compile,
        "batch_size": config.batch_size,
        "steps": steps,
        "warmup": warmup,
        "input_size": list(input_size),
        "data": "synthetic uint8",
        "gflop_per_image": {key: value / 1e9 for key, value in flops.items()},
        "peak_tflops": peak,
        "results": results,
    }


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (backward's included: the mode travels to the
    autograd engine), in two kinds: ``count``, ops that compute (on a GPU each launches at least
    one kernel, so the count says how launch-bound a step is, whatever the device), and ``views``,
    ops that only make another view of a tensor (detach, transpose, expand...: no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _Bench:
    """The three timed loops, sharing the device, batch size, step counts and peak."""

    def __init__(self, device: torch.device, batch_size: int, steps: int, warmup: int, peak: float | None,
                 matmul: float | None):
        self.device, self.batch_size, self.steps, self.warmup = device, batch_size, steps, warmup
        self.peak, self.matmul = peak, matmul

    def modes(self, modes: tuple[str, ...], config: TrainConfig, net: nn.Module, step_model: nn.Module,
              prep: nn.Module, flops: dict[str, int], count_ops: bool = True) -> dict:
        """Each of ``modes`` measured in turn -> {mode: result}; the synthetic data made once."""
        input_size = tuple(net.pretrained_cfg["input_size"])
        data = None
        results = {}
        for each in modes:
            if each != "infer" and data is None:
                data = synthetic_data(input_size, net.num_classes, config.batch_size, self.device)
            if each == "data":
                results[each] = self.data(config, data, prep)
            elif each == "infer":
                results[each] = self.infer(step_model, net, input_size, prep, memory_format(config),
                                           config.precision, flops["forward"])
            else:
                results[each] = self.train(config, net, data, prep, flops["train"], count_ops)
        return results

    def data(self, config: TrainConfig, data: splits.ImageData, prep: nn.Module) -> dict:

        batches = _stream(data, self.batch_size, self.device)
        generator = torch.Generator(device=self.device)
        counter = itertools.count()

        def step():
            images, _ = next(batches)
            batch_inputs(config, prep, images, 0, next(counter), generator)

        return self._measure(step, None)

    def infer(self, step_model: nn.Module, net: nn.Module, input_size, prep: nn.Module, memory_format,
              precision: str, flops: int) -> dict:
        net.eval()
        generator = torch.Generator(device=self.device).manual_seed(0)
        images = torch.randint(0, 256, (self.batch_size, *input_size), generator=generator,
                               device=self.device, dtype=torch.uint8)
        x = prep(images.float() / 255).contiguous(memory_format=memory_format)

        def step():
            with torch.inference_mode(), autocast(self.device, precision):
                step_model(x)

        return self._measure(step, flops)

    def train(self, config: TrainConfig, net: nn.Module, data: splits.ImageData, prep: nn.Module,
              flops: int, count_ops: bool = True) -> dict:
        net.train()
        steps_per_epoch = self.warmup + self.steps + Lookahead.EVERY + 1
        learner = make_learner(config, net, prep, net.num_classes, steps_per_epoch=steps_per_epoch)
        batches = _stream(data, self.batch_size, self.device)
        generator = torch.Generator(device=self.device)
        counter = itertools.count()

        def step():
            images, labels = next(batches)
            train_step(learner, images, labels, 0, next(counter), generator)

        result = self._measure(step, flops)
        if not count_ops:
            return result
        ops, views = [], []  # over Lookahead.EVERY steps in a row, so that a lookahead step is among them
        for _ in range(Lookahead.EVERY):
            images, labels = next(batches)
            with OpCounter() as dispatched:
                train_step(learner, images, labels, 0, next(counter), generator)
            ops.append(dispatched.count)
            views.append(dispatched.views)
        return {**result, "ops_per_step": sum(ops) / len(ops), "ops_per_step_max": max(ops),
                "view_ops_per_step": sum(views) / len(views)}

    def _measure(self, step: Callable[[], None], flops: int | None) -> dict:
        rss_reset = reset_peak_rss()
        others = []

        def begin():  # the timed steps' peak, not cuDNN's trials of workspaces in the warm-up
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            others.append(OthersUse(usable_cores()))

        seconds = timed(step, self.warmup, self.steps, self.device, begin)
        others_cores = others[0].cores_used()
        images_per_s = self.steps * self.batch_size / seconds
        tflop_per_s = None if flops is None else images_per_s * flops / 1e12
        return {
            "images_per_s": images_per_s,
            "step_ms": 1000 * seconds / self.steps,
            "gflop_per_image": None if flops is None else flops / 1e9,
            "tflop_per_s": tflop_per_s,
            "peak_share": None if tflop_per_s is None or self.peak is None else tflop_per_s / self.peak,
            "matmul_share": None if tflop_per_s is None or self.matmul is None else tflop_per_s / self.matmul,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_since": "mode start" if rss_reset else "process start",
            "peak_cuda_mb": (torch.cuda.max_memory_allocated(self.device) / 2**20
                             if self.device.type == "cuda" else None),
            "others_cores": others_cores,  # cores other processes kept busy while the steps were timed
        }


def _stream(data: splits.ImageData, batch_size: int, device: torch.device):
    """Shuffled full batches of ``data``, epoch after epoch, as the trainer draws them."""
    batches = Batches(data, batch_size, shuffle=True, drop_last=True, device=device)
    for epoch in itertools.count():
        yield from batches.epoch(epoch)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
