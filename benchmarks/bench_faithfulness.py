"""allconv faithfulness against the plain PyTorch a user would write today, in one run on one machine.

    python benchmarks/bench_faithfulness.py                       # 1,000 sample test images, 20 for the baseline
    python benchmarks/bench_faithfulness.py --images 100 --baseline-images 10

allconv's side is the library under ``allconv faithfulness`` (``explain.faithfulness.faithfulness``)
with the command's defaults: every map (the saliency methods, random, Sobel), deletion and insertion
in 10 steps with the blurred baseline, ROAD MoRF and LeRF at 10 % to 90 %, ``--precision auto``;
perturbed images are built and scored a batch of (step, image) rows at a time, BatchNorm folded
into the convs, and ROAD's imputation is one batched conjugate-gradient solve per chunk.

The baseline is written out below as a user would: the same maps (allconv's ``saliency_maps``,
so that only the metrics differ), then per image a batch of its deletion and insertion steps
through the model in fp32, and ROAD by pytorch-grad-cam's ``ROADMostRelevantFirstAverage`` and
``ROADLeastRelevantFirstAverage`` (Rong et al.'s imputer, scipy's sparse solver, one image and
one level at a time) with its softmax target. It is timed on fewer images (``--baseline-images``)
because it is slow; rates per image are compared. Both sides run in this process, one after the
other, with torch's thread count as it is (set OMP_NUM_THREADS to change it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from importlib.metadata import version

import torch

from allconv_cli.data.datasets import load_split
from allconv_cli.data.splits import limit
from allconv_cli.device import cpu_flags
from allconv_cli.explain.faithfulness import BATCH, faithfulness
from allconv_cli.explain.methods import MODEL_FREE, SALIENCY_METHODS
from allconv_cli.explain.perturbation import baseline_inputs, model_free_map, relevance
from allconv_cli.explain.saliency import saliency_maps
from allconv_cli.explain.targets import default_layer, select_targets
from allconv_cli.files.loading import load_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images for allconv's side (default 1000)")
    parser.add_argument("--baseline-images", type=int, default=20, help="images for the baseline (default 20)")
    parser.add_argument("--precision", default="auto", help="allconv's --precision (default auto)")
    parser.add_argument("--batch-size", type=int, default=BATCH,
                        help=f"images per batch on both sides, at most each side's images (default {BATCH})")
    return parser.parse_args(argv)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def allconv_side(loaded, count: int, precision: str, batch_size: int) -> dict:
    result = faithfulness(loaded, count=count, precision=precision, batch_size=min(batch_size, count))
    return {"images": len(result.names), "seconds": result.seconds, "precision": result.precision}


def plain_side(loaded, count: int, batch_size: int, steps: int = 10) -> dict:
    """The baseline: per image, deletion and insertion as one batch of steps; ROAD by pytorch-grad-cam."""
    from pytorch_grad_cam.metrics.road import (
        ROADLeastRelevantFirstAverage,
        ROADMostRelevantFirstAverage,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    started = time.perf_counter()
    model, layer = loaded.model.eval(), default_layer(loaded.model)
    data = limit(load_split("sample", "test", None, loaded.input_size), count, 0)
    morf, lerf = ROADMostRelevantFirstAverage(), ROADLeastRelevantFirstAverage()
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(data), batch_size):
        images = data.images[start:start + batch_size].float() / 255
        inputs = loaded.preprocess(images)
        targets = select_targets(model, inputs, None, target_class="predicted")
        blurred = baseline_inputs(inputs, "blur")
        for method in (*SALIENCY_METHODS, *MODEL_FREE):
            maps = model_free_map(method, images, generator) if method in MODEL_FREE else \
                saliency_maps(model, inputs, targets, method, cam_layer=layer)
            cams = relevance(maps)
            for i, target in enumerate(targets):
                order = cams[i].flatten().argsort(descending=True)
                stack = []
                for k in range(steps + 1):
                    top = torch.zeros(order.numel(), dtype=torch.bool)
                    top[order[: round(k / steps * order.numel())]] = True
                    top = top.view(1, *cams.shape[1:])
                    stack += [torch.where(top, blurred[i], inputs[i]), torch.where(top, inputs[i], blurred[i])]
                with torch.no_grad():
                    model(torch.stack(stack)).softmax(1)[:, target.channel]
            softmax = [ClassifierOutputSoftmaxTarget(t.channel) for t in targets]
            morf(inputs, cams.numpy(), softmax, model)
            lerf(inputs, cams.numpy(), softmax, model)
    return {"images": len(data), "seconds": time.perf_counter() - started, "precision": "fp32"}


def main(argv=None):
    options = parse_args(argv)
    loaded = load_checkpoint()
    load_before = os.getloadavg()
    rows = [("allconv", allconv_side(loaded, options.images, options.precision, options.batch_size)),
            ("allconv, the baseline's images", allconv_side(loaded, options.baseline_images, options.precision,
                                                            options.batch_size)),
            ("plain PyTorch + pytorch-grad-cam ROAD", plain_side(loaded, options.baseline_images, options.batch_size))]
    plain_rate = rows[-1][1]["seconds"] / rows[-1][1]["images"]
    print(f"# faithfulness benchmark, {datetime.date.today().isoformat()}\n")
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    flags = " ".join(sorted(cpu_flags() & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})) or "none of note"
    print(f"CPU: {cpu_model()} (flags: {flags}), {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"torch {torch.__version__}, timm {version('timm')}, grad-cam {version('grad-cam')}, "
          f"scipy {version('scipy')}, Python {platform.python_version()}\n")
    print("| side | precision | images | seconds | s / image | images / s | plain's s / image ÷ this |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, row in rows:
        per = row["seconds"] / row["images"]
        print(f"| {name} | {row['precision']} | {row['images']} | {row['seconds']:.1f} | {per:.3f} | "
              f"{1 / per:.2f} | {plain_rate / per:.1f}x |")


if __name__ == "__main__":
    main()
