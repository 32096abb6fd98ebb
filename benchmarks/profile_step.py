"""Where the trainer's step spends its time: torch.profiler over the real ``train_step`` of a
recipe, on synthetic uint8 batches already on the device.

Prints, per step: host (CPU) milliseconds, device kernel milliseconds, kernels launched and aten
ops dispatched, then the ops that cost the host most. A step whose host time is well above its
kernel time is launch-bound: the GPU waits for Python.

    python benchmarks/profile_step.py --preset fast-cifar10 --device cuda [--compile] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from allconv_cli.data.preprocess import Standardize
from allconv_cli.device import resolve_device, resolve_precision
from allconv_cli.models.registry import create_model, resolve_name
from allconv_cli.train.learner import make_learner
from allconv_cli.train.settings import model_kwargs, resolve
from allconv_cli.train.step import train_step


def profile_step(preset: str | None, device: str, steps: int, warmup: int, compile: bool, batch_size: int) -> dict:
    dev = resolve_device(device)
    overrides = {"compile": compile, "batch_size": batch_size}
    config = resolve(preset, **overrides)
    config = type(config)(**{**config.__dict__, "precision": resolve_precision(config.precision, dev)})
    name = resolve_name(config.model)
    net = create_model(name, **model_kwargs(config, 10)).to(dev, memory_format=torch.channels_last)
    net.train()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = tuple(net.pretrained_cfg["input_size"])
    prep = Standardize(net.pretrained_cfg["mean"], net.pretrained_cfg["std"]).to(dev)
    learner = make_learner(config, net, prep, 10, steps_per_epoch=warmup + steps + 1)
    generator = torch.Generator(device=dev)
    images = torch.randint(0, 256, (batch_size, *size), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (batch_size,), device=dev)
    counter = itertools.count()
    for _ in range(warmup):
        train_step(learner, images, labels, 0, next(counter), generator)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(learner, images, labels, 0, next(counter), generator)
    sync()
    wall_ms = 1000 * (time.perf_counter() - started) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(learner, images, labels, 0, next(counter), generator)
        sync()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    aten = [e for e in events if e.key.startswith("aten::")]
    top = sorted(aten, key=lambda e: -e.self_cpu_time_total)[:20]
    return {"preset": preset or "default", "device": str(dev), "precision": config.precision, "compile": compile,
            "batch_size": batch_size, "wall_ms_per_step": wall_ms,
            "kernels_per_step": sum(e.count for e in kernels) / steps,
            "kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / steps / 1000,
            "aten_calls_per_step": sum(e.count for e in aten) / steps,
            "top_host_ops": [{"op": e.key, "calls_per_step": e.count / steps,
                              "self_cpu_us_per_step": e.self_cpu_time_total / steps} for e in top],
            "top_kernels": [{"kernel": e.key[:90], "calls_per_step": e.count / steps,
                             "us_per_step": e.self_device_time_total / steps}
                            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="a preset name or file (default: the default settings)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = profile_step(args.preset, args.device, args.steps, args.warmup, args.compile, args.batch_size)
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['preset']} on {out['device']} ({out['precision']}, batch {out['batch_size']}, compile {out['compile']}):"
          f" {out['wall_ms_per_step']:.2f} ms a step, {out['kernel_ms_per_step']:.2f} ms of kernels,"
          f" {out['kernels_per_step']:.0f} kernels, {out['aten_calls_per_step']:.0f} aten calls")
    for row in out["top_host_ops"]:
        print(f"  {row['op']:<40} {row['calls_per_step']:6.1f} calls {row['self_cpu_us_per_step']:9.0f} us")


if __name__ == "__main__":
    main()
