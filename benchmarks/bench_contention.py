"""Training beside other work: the trainer's step on an idle CPU and beside 1 and 2 busy
processes, against plain PyTorch measured the same way in the same run.

    python benchmarks/bench_contention.py --out benchmarks/RESULTS.md

A busy process is a single-threaded Python loop (``while True: pass``), started before a
measurement and stopped after it. allconv's side is ``allconv_cli.benchmark.run`` in train mode:
the trainer's own step with its threads as ``allconv train`` picks them (one per free core, or
``--threads``), for the default recipe, ``--preset faithful`` and ``--preset paper-cifar10``,
``--precision auto``. The baseline is the plain PyTorch step a user would write: the same
All-CNN-C as the faithful recipe, fp32, NCHW, SGD with the faithful preset's settings, on batches
already in memory, with torch's default thread count. Each measurement runs in a fresh process
(so each chooses its threads anew and no thread pool carries over), with the same timer (warm-up
steps, then timed steps). Each side's speed under load is given as a share of its own idle speed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from bench_train import in_fresh_process, publish

from allconv_cli import __version__
from allconv_cli.cpu_threads import BUSY_MARGIN

SIDES = ("default", "faithful", "paper-cifar10", "plain PyTorch")
BASELINE = "plain PyTorch"
# Printed beside the measurements, never asserted: allconv's share of its own idle speed beside
# one busy process is at least this and at least the baseline's; beside more, at least the baseline's.
LEAST_SHARE_BESIDE_ONE = 0.70
SETTLE_SECONDS = 0.5  # for the busy processes to be running before a measurement starts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="0,1,2", help="busy processes beside each measurement (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="allconv's threads, as --threads gives them (default: one per free core)")
    parser.add_argument("--out", type=Path, default=None, metavar="RESULTS_PATH",
                        help="append the results to this Markdown file as a dated section")
    options = parser.parse_args(argv)
    try:
        options.loads = [int(n) for n in options.loads.split(",")]
    except ValueError:
        parser.error(f"--loads takes comma-separated whole numbers, got {options.loads!r}")
    if any(n < 0 for n in options.loads) or 0 not in options.loads:
        parser.error("--loads must include 0 (the idle speed each share is of) and no negative number")
    return options


def allconv_step(preset: str | None, options: argparse.Namespace) -> dict:
    """images/s of the trainer's step for ``preset`` (None: the defaults) on the CPU."""
    from allconv_cli import benchmark
    from allconv_cli.train.settings import resolve

    result = benchmark.run(resolve(preset, device="cpu"), "train", options.steps, options.warmup, options.threads,
                           speed_only=True)
    return {"images_per_s": result["results"]["train"]["images_per_s"], "threads": result["threads"],
            "busy_cores": result["busy_cores"], "precision": result["precision"]}


def plain_step(options: argparse.Namespace) -> dict:
    """images/s of a plain PyTorch training step: fp32, NCHW, SGD, torch's default threads."""
    import torch
    import torch.nn.functional as F

    from allconv_cli import benchmark
    from allconv_cli.cpu_threads import OthersUse, usable_cores
    from allconv_cli.models import create_model
    from allconv_cli.train.settings import resolve

    torch.manual_seed(0)
    model = create_model("all-cnn-c").train()
    recipe = resolve("faithful")
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    batches = itertools.cycle([(torch.randn(recipe.batch_size, 3, 32, 32), torch.randint(0, 10, (recipe.batch_size,)))
                               for _ in range(4)])

    def step():
        images, labels = next(batches)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    others = []
    seconds = benchmark.timed(step, options.warmup, options.steps, torch.device("cpu"),
                              lambda: others.append(OthersUse(usable_cores())))
    return {"images_per_s": options.steps * recipe.batch_size / seconds, "threads": torch.get_num_threads(),
            "busy_cores": others[0].cores_used(), "precision": "fp32"}


def measure(side: str, options: argparse.Namespace) -> dict:
    if side == BASELINE:
        return plain_step(options)
    return allconv_step(None if side == "default" else side, options)


def beside_busy(count: int, side: str, options: argparse.Namespace) -> dict:
    """``side``'s measurement with ``count`` busy single-threaded processes running."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(SETTLE_SECONDS if busy else 0)
        return in_fresh_process(functools.partial(measure, side), options)
    finally:
        for process in busy:
            process.kill()
            process.wait()


def cpu_description() -> str:
    """The CPU's model and its flags that decide the kernels (vector width, bf16), from /proc/cpuinfo."""
    from allconv_cli.benchmark import device_name
    from allconv_cli.device import cpu_flags

    shown = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return f"{device_name(__import__('torch').device('cpu'))} (flags: {', '.join(shown) or 'none of avx2/avx512/amx'})"


def share(results: dict, side: str, load: int) -> float:
    """``side``'s speed beside ``load`` busy processes as a share of its own idle speed."""
    return results[side, load]["images_per_s"] / results[side, 0]["images_per_s"]


def met(results: dict, side: str, loads: list[int]) -> str:
    """'yes' where every loaded share meets its target, else the loads where it falls short."""
    short = [n for n in loads if n and share(results, side, n) < max(share(results, BASELINE, n),
                                                                       LEAST_SHARE_BESIDE_ONE if n == 1 else 0)]
    return "yes" if not short else "no: beside " + ", ".join(map(str, short))


def report(results: dict, options: argparse.Namespace, command: str, date: str) -> str:
    """The Markdown section: machine, versions, command and the table of speeds and shares."""
    loads = sorted(options.loads)
    header = "| side | threads | " + " | ".join(
        "idle img/s" if n == 0 else f"beside {n} busy: img/s (share of idle)" for n in loads) + " | target met |"
    lines = [
        f"## {date}: training beside busy processes, {cpu_description()}",
        "",
        f"- {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores; "
        f"torch {version('torch')}, allconv {__version__}",
        f"- command: `{command}`",
        f"- {options.steps} timed steps after {options.warmup} warm-up steps per measurement, each in a fresh "
        "process; a busy process is a single-threaded Python loop",
        "",
        header,
        "|---|---|" + "---:|" * len(loads) + "---|",
    ]
    for side in SIDES:
        idle = results[side, 0]["images_per_s"]
        cells = [f"{idle:,.0f}"] + [f"{results[side, n]['images_per_s']:,.0f} "
                                    f"({100 * share(results, side, n):.0f} %)" for n in loads if n]
        threads = "/".join(str(results[side, n]["threads"]) for n in loads)
        name = side if side == BASELINE else f"allconv {side} ({results[side, 0]['precision']})"
        lines.append(f"| {name} | {threads} | " + " | ".join(cells) + f" | {'' if side == BASELINE else met(results, side, loads)} |")
    busy = ", ".join(f"{n} busy: {max((results[s, n]['busy_cores'] or 0) for s in SIDES):.1f}" for n in loads)
    lines += ["", f"Threads: as each side ran at {'/'.join(map(str, loads))} busy processes. Most cores others "
                  f"kept busy, measured during the timed steps: {busy}. Target: beside one busy process, a share "
                  f"of at least {LEAST_SHARE_BESIDE_ONE:.0%} and at least plain PyTorch's; beside more, at least "
                  "plain PyTorch's."]
    idle_load = max((results[s, 0]["busy_cores"] or 0) for s in SIDES)
    if idle_load >= BUSY_MARGIN:
        lines += ["", f"Warning: other processes kept {idle_load:.1f} cores busy during the idle measurements, so the "
                      "shares are not of idle speeds: run this on a machine with nothing else running."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    options = parse_args(argv)
    results = {}
    for count in sorted(options.loads):
        for side in SIDES:
            results[side, count] = beside_busy(count, side, options)
            print(f"{side}, beside {count} busy: {results[side, count]['images_per_s']:,.1f} img/s, "
                  f"{results[side, count]['threads']} threads", file=sys.stderr, flush=True)
    publish(lambda command, date: report(results, options, command, date), "bench_contention.py", argv, options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
