"""Where and how tensors run: device choice, autocast and the model's memory format."""

from __future__ import annotations

import contextlib
import ctypes

import torch

from allconv_cli.choices import PRECISIONS


def available_devices() -> list[str]:
    """What ``--device`` can name on this machine: cpu, each CUDA GPU (cuda:0, cuda:1, ...) and
    the devices of another accelerator torch finds here (mps; xpu:0, ...)."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    other = torch.accelerator.current_accelerator(check_available=True)
    if other is not None and other.type == "mps":  # one Apple GPU, named without an index
        names.append("mps")
    elif other is not None and other.type != "cuda":
        names += [f"{other.type}:{i}" for i in range(torch.accelerator.device_count())]
    return names


def resolve_device(name: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; a name torch does not know,
    meta (no data), or a device this machine does not have raises, naming those it has. Under
    torchrun (``local_rank`` given), a CUDA device becomes the process's own, ``cuda:LOCAL_RANK``."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    fix = f"give --device auto or one this machine has: {', '.join(available_devices())}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: {fix}") from None
    if device.type == "meta":
        raise ValueError(f"device 'meta' holds no data, so nothing runs on it: {fix}")
    if device.type not in ("cuda", "cpu") and not _has(device):
        raise ValueError(f"device {name!r} asked for, but this machine has no {device.type} device: {fix}")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"device {name!r}: the CPU is one device, cpu (or cpu:0): {fix}")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here: {fix}")
    count = torch.cuda.device_count()
    if local_rank is not None:
        if local_rank >= count:
            raise ValueError(f"torchrun started process {local_rank} of this machine, but it has {count} "
                             f"GPU{'s' if count != 1 else ''}: give torchrun --nproc-per-node {count} or fewer")
        return torch.device("cuda", local_rank)
    if device.index is not None and device.index >= count:
        # a run resumed on a machine with fewer GPUs, say: CUDA's own error is "invalid device ordinal"
        raise ValueError(f"device {name!r} asked for, but this machine has {count} GPU{'s' if count != 1 else ''} "
                         f"(cuda:0 to cuda:{count - 1}): give --device cuda or cuda:N below {count} "
                         "(--resume takes a new --device too)")
    return device


def _has(device: torch.device) -> bool:
    """Whether this machine has ``device`` of an accelerator other than CUDA (mps, xpu, ...)."""
    other = torch.accelerator.current_accelerator(check_available=True)
    return (other is not None and other.type == device.type
            and (device.index or 0) < torch.accelerator.device_count())


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 on its tensor cores: compute capability 8.0 (Ampere) or
    later. ``torch.cuda.is_bf16_supported()`` also counts bf16 that older GPUs (T4, V100) only
    emulate, far slower than their fp16 or fp32."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_kernels() -> dict[str, bool]:
    """Whether oneDNN can run bf16 convolutions natively on this CPU: AMX tiles (recent Xeons)
    or AVX-512 BF16 (Cooper Lake and later Xeons, AMD Zen 4 and later). torch 2.14 exposes no
    query for these, so the CPU's flags are read; without oneDNN neither counts."""
    flags = cpu_flags() if torch.backends.mkldnn.is_available() else set()
    return {"amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def resolve_precision(name: str | None, device: torch.device) -> str:
    """``auto`` -> bf16 where the device computes it natively (CUDA with bf16, CPUs with AMX or
    AVX-512 BF16), else fp32; an explicit name is checked against the device."""
    if name in (None, "auto"):
        if device.type == "cuda":
            return "bf16" if native_bf16(device) else "fp32"
        return "bf16" if any(cpu_bf16_kernels().values()) else "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast runs on CUDA only: use --precision bf16 or fp32 on the CPU")
    return name


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision`` (a resolved name: fp32, bf16 or fp16) on ``device``.

    Weights, optimizer state and BatchNorm's parameters and statistics stay fp32; convolutions
    run in the low precision with fp32 accumulation. fp32 is a no-op context.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def tune_cpu_allocator():
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel.

    A CIFAR batch's activations are tens of MB each (128 x 96 x 32 x 32 fp32 = 48 MiB), above
    glibc's largest mmap threshold (32 MiB), so by default every step maps them afresh and the
    kernel zeroes each new page: ~120,000 page faults and ~0.4 CPU-s per All-CNN-C training
    step at batch 128. A no-op where the C library has no mallopt (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, never from fresh mappings
    mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: return heap memory only when 1 GiB is free at its top
