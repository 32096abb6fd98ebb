"""Where and how tensors run: device choice, autocast and the model's memory format."""

from __future__ import annotations

import contextlib
import ctypes

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; bad names raise."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu")
    return device


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op context otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """Move ``model`` to ``device``, in channels_last memory format if asked (fast on CUDA)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


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
