"""allconv against the plain PyTorch a user would write, measured in one run on one machine:
training end to end (data + step), the data path alone, inference and peak memory.

    python benchmarks/bench_train.py --steps 30 --warmup 5 --out benchmarks/RESULTS.md

allconv's side is ``allconv_cli.benchmark`` with ``--preset faithful`` (the paper's network and
SGD) and ``--precision auto``, as ``allconv train`` runs them: the trainer's own step (uint8
batches held in memory on the device, batch-wise augmentation and standardization there,
channels_last, bf16 autocast where the CPU or GPU computes bf16 natively), inference under
``torch.inference_mode``. The baseline is written out below: fp32, NCHW, a
torchvision ``DataLoader`` over a Dataset that hands out PIL images as torchvision's CIFAR10
does, with per-sample ``RandomCrop(padding=5)`` (the paper's translations of up to 5 pixels),
``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize``, ``min(8, CPUs)`` workers, and a plain
training loop; inference under ``torch.no_grad``.

Both sides get the same synthetic images (``allconv_cli.benchmark.synthetic_data``: 50,000
random uint8 images at 32x32), the same network and the faithful preset's SGD settings, the same
timer (warm-up steps, then timed steps between device synchronizations) and, on an idle
machine, the same thread count (torch's default, one per core; allconv's, one per free core). Each side runs in a fresh process, so that neither's memory or thread pools
count against the other. Peak memory is the resident set size of the process that trains,
from the start of its warm-up; the baseline's DataLoader workers are separate processes and
are not counted. Each side also measures a large matmul in its own precision, the limit its
training step is held against ("% of matmul").
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import multiprocessing
import re
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path

from allconv_cli import __version__

RSS_LIMIT_MIB = 2048
# Both sides train the paper's network (no BatchNorm, its dropout) with SGD: allconv's faithful
# preset, whose settings the baseline reads too. The default recipe's Muon, BatchNorm and frozen
# first conv would make the two sides different work.
RECIPE = "faithful"
# Printed beside the measurements, never asserted: (how, value) per kind of device and row.
# "cpu-bf16": a CPU with native bf16 (AMX or AVX-512 BF16), where allconv's auto runs bf16.
TARGETS = {
    "cpu-bf16": {"train": ("ratio", 4.5), "infer": ("ratio", 3.0), "rss": ("below", RSS_LIMIT_MIB)},
    "cpu": {"train": ("ratio", 1.65), "matmul": ("share", 75), "rss": ("below", RSS_LIMIT_MIB)},
    "cuda": {"train": ("at least", 150_000), "data": ("at least", 1_000_000)},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--model", default="all-cnn-c", help="registry name (default all-cnn-c)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    parser.add_argument("--infer-batch-size", type=int, default=256, help="inference batch size (default 256)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement (default 20 on the CPU, 200 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before them (default 5 on the CPU, 50 on CUDA)")
    parser.add_argument("--out", type=Path, default=None, metavar="RESULTS_PATH",
                        help="append the results to this Markdown file as a dated section, replacing "
                             "a section of the same date, device and command")
    return parser.parse_args(argv)


# --- allconv ----------------------------------------------------------------------------------

def allconv_side(options: argparse.Namespace) -> dict:
    """allconv's training step, data path and inference, from its benchmark library."""
    from allconv_cli import benchmark
    from allconv_cli.train.settings import resolve

    def config(batch_size: int):  # the paper's network and SGD, as the baseline trains them
        return resolve(RECIPE, model=options.model, batch_size=batch_size, device=options.device)

    common = dict(steps=options.steps, warmup=options.warmup)
    train = benchmark.run(config(options.batch_size), "train", **common)
    data = benchmark.run(config(options.batch_size), "data", **common)
    infer = benchmark.run(config(options.infer_batch_size), "infer", **common)
    keys = ("device", "device_name", "cpus", "threads", "precision", "kernels", "matmul_tflops", "steps", "warmup")
    return {**{k: train[k] for k in keys}, "train": train["results"]["train"], "data": data["results"]["data"],
            "infer": infer["results"]["infer"]}


# --- the baseline: plain PyTorch --------------------------------------------------------------

def baseline_side(options: argparse.Namespace) -> dict:
    """The plain PyTorch pipeline: PIL images, per-sample transforms in DataLoader workers, fp32
    NCHW; timed with the same timer as allconv's side."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    from allconv_cli import benchmark
    from allconv_cli.device import resolve_device
    from allconv_cli.models import create_model
    from allconv_cli.train.settings import resolve

    class PILDataset(torch.utils.data.Dataset):
        """uint8 (N, H, W, C) images handed out one PIL image at a time, as torchvision's CIFAR10."""

        def __init__(self, images, labels, transform):
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])

    device = resolve_device(options.device)
    steps, warmup = benchmark.resolve_steps(device, options.steps, options.warmup)
    torch.manual_seed(0)
    model = create_model(options.model).to(device)
    channels, height, width = model.pretrained_cfg["input_size"]
    synthetic = benchmark.synthetic_data((channels, height, width), model.num_classes, options.batch_size,
                                         torch.device("cpu"))
    dataset = PILDataset(synthetic.images.permute(0, 2, 3, 1).contiguous().numpy(), synthetic.labels.numpy(),
                         transforms.Compose([
                             transforms.RandomCrop((height, width), padding=5),
                             transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize(model.pretrained_cfg["mean"], model.pretrained_cfg["std"]),
                         ]))
    del synthetic  # the Dataset holds its (N, H, W, C) copy; free the (N, C, H, W) original
    workers = min(8, benchmark.cpu_count())
    # fork, Linux's default through Python 3.13, which a user's script gets; this process was
    # spawned and would hand spawn down, pickling the data set to every worker.
    loader = torch.utils.data.DataLoader(dataset, batch_size=options.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=True, multiprocessing_context="fork")
    batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch

    def data_step():
        images, labels = next(batches)
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    recipe = resolve(RECIPE, model=options.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)

    def train_step():
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    x = torch.randn(options.infer_batch_size, channels, height, width, device=device)

    def infer_step():
        with torch.no_grad():
            model(x)

    def measure(step, batch_size):
        benchmark.reset_peak_rss()
        seconds = benchmark.timed(step, warmup, steps, device)
        return {"images_per_s": steps * batch_size / seconds, "peak_rss_mb": benchmark.peak_rss_mb()}

    data = measure(data_step, options.batch_size)
    model.train()
    train = measure(train_step, options.batch_size)
    train["tflop_per_s"] = train["images_per_s"] * benchmark.count_flops(model, (channels, height, width))["train"] / 1e12
    model.eval()
    infer = measure(infer_step, options.infer_batch_size)
    return {"train": train, "data": data, "infer": infer, "workers": workers,
            "matmul_tflops": benchmark.matmul_tflops(device, "fp32"),
            "kernels": benchmark.kernel_path(device, "fp32")}


# --- report -----------------------------------------------------------------------------------

def in_fresh_process(function, options):
    """``function(options)`` in a newly spawned interpreter; its exceptions re-raise here."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(function, options).result()


def target(kind: str, row: str, allconv: float, ratio: float) -> tuple[str, str]:
    """(target, met) for a row on this kind of device; blank where there is no target."""
    how, value = TARGETS.get(kind, {}).get(row, (None, None))
    if how == "ratio":
        return f">= {value}x baseline", "yes" if ratio >= value else "no"
    if how == "at least":
        return f">= {value:,} images/s", "yes" if allconv >= value else "no"
    if how == "below":
        return f"< {value:,} MiB", "yes" if allconv < value else "no"
    if how == "share":
        return f">= {value} % of matmul", "yes" if allconv >= value else "no"
    return "", ""


def report(options: argparse.Namespace, allconv: dict, baseline: dict, command: str, date: str) -> str:
    """The Markdown section: machine, versions, command, the table and what each side ran."""
    kind = allconv["device"].split(":")[0]
    kind = "cpu-bf16" if kind == "cpu" and allconv["precision"] == "bf16" else kind
    for side in (allconv, baseline):  # the training step's share of its own precision's matmul rate, %
        side["matmul"] = {"share": 100 * side["train"]["tflop_per_s"] / side["matmul_tflops"]}
    batch = options.batch_size
    rows = [
        ("train", f"training images/s, data + step, batch {batch}", "images_per_s", "train"),
        ("data", f"data path images/s, batch {batch}", "images_per_s", "data"),
        ("infer", f"inference images/s, batch {options.infer_batch_size}", "images_per_s", "infer"),
        ("matmul", "training TFLOP/s as % of the matmul rate in its precision", "share", "matmul"),
        ("rss", "peak RSS during training, MiB", "peak_rss_mb", "train"),
    ]
    lines = [
        f"## {date}: {allconv['device_name']} ({kind})",
        "",
        f"- device: {allconv['device_name']} ({allconv['device']}), {allconv['cpus']} CPUs, "
        f"{allconv['threads']} torch threads",
        f"- versions: torch {version('torch')}, torchvision {version('torchvision')}, allconv {__version__}",
        f"- command: `{command}`",
        f"- {allconv['steps']} timed steps after {allconv['warmup']} warm-up steps per measurement; "
        f"allconv {allconv['precision']}, channels_last, {allconv['kernels']}, matmul "
        f"{allconv['matmul_tflops']:.3f} TFLOP/s; baseline fp32, NCHW, {baseline['kernels']}, matmul "
        f"{baseline['matmul_tflops']:.3f} TFLOP/s, {baseline['workers']} DataLoader workers",
        f"- targets for a {kind} device: " + {"cpu-bf16": "a CPU with native bf16 (AMX or AVX-512 BF16)",
                                               "cpu": "a CPU without native bf16 (AVX2 or AVX-512 only)",
                                               }.get(kind, "a GPU"),
        "",
        "| measurement | allconv | baseline | allconv / baseline | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row, label, key, mode in rows:
        ours, theirs = allconv[mode][key], baseline[mode][key]
        goal, met = target(kind, row, ours, ours / theirs)
        lines.append(f"| {label} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str):
    """Append ``section`` to the Markdown file at ``path``, replacing one with the same heading
    and command (a re-run on the same day and device)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nWritten by `benchmarks/bench_train.py`.\n"
    heading, command = section.splitlines()[0], re.search(r"^- command: .*$", section, re.M).group(0)
    parts = re.split(r"(?m)^(?=## )", text)
    kept = [p for p in parts if not (p.startswith(heading + "\n") and command in p)]
    body = "".join(kept).rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def main(argv=None) -> int:
    options = parse_args(argv)
    try:  # allconv's side runs first and checks the model, device and counts
        allconv = in_fresh_process(allconv_side, options)
        baseline = in_fresh_process(baseline_side, options)
    except (ValueError, OSError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    publish(lambda command, date: report(options, allconv, baseline, command, date), "bench_train.py", argv,
            options.out)
    return 0


def publish(section, script: str, argv, out: Path | None):
    """Print ``section(command, date)`` for this run of ``benchmarks/script``, and append it to
    ``out`` where given."""
    command = shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    text = section(command, datetime.date.today().isoformat())
    print(text)
    if out is not None:
        write_section(out, text)
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
