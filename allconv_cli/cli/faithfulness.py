"""allconv faithfulness: which saliency map points at what the model uses (deletion, insertion, ROAD)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import (
    AsJson,
    Device,
    Force,
    Quiet,
    Threads,
    duration,
    make_console,
    out_option,
    progress_bar,
    refuse_existing,
    user_errors,
)
from allconv_cli.cli.method_options import with_method_settings
from allconv_cli.data.sources import DATA_SOURCES
from allconv_cli.explain.methods import METHODS, MODEL_FREE, check_methods
from allconv_cli.util import plural

_COLUMNS = {"deletion": "deletion AUC ↓", "insertion": "insertion AUC ↑", "road_morf": "ROAD MoRF ↓",
            "road_lerf": "ROAD LeRF ↑"}
# Images scored when --limit is not given: a first look a newcomer waits for. On a 2-core AMD EPYC
# (Zen 4, AVX-512 BF16) shared with other jobs (load average 9 to 13), torch 2.14.1, 2026-12-06, the
# bundled model's seven maps in bf16: 10 images took 36 s in all with OMP_NUM_THREADS=1 and 3 min 17 s
# with torch's two threads, which wait on each other under load; 20 took 3 min 47 s with two threads,
# as they took 3 min 33 s on a loaded 2-core AVX2 CPU in fp32.
DEFAULT_LIMIT = 10
_MAPS_HELP = (f"Comma-separated: {', '.join(METHODS)}, and the model-free maps "
              f"{' and '.join(f'{name} ({about})' for name, about in MODEL_FREE.items())}. Default: all of them.")


@with_method_settings
def faithfulness(
    images: Annotated[Optional[list[Path]], typer.Argument(show_default=False, help="Image files to score instead of a data split, fitted to the model's input as visualize fits them.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", show_default=False, help="Run folder or .safetensors weights. Default: the bundled All-CNN-C trained on CIFAR-10.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", show_default=False, help="A timm or torchvision net (e.g. resnet18) whose plain safetensors state dict is --checkpoint; preprocessed with its own mean, std, input size and resizing.")] = None,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=f"Data set to score when no IMAGES are given: {', '.join(DATA_SOURCES)}.")] = "sample",
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", show_default=False, help="Folder of the --dataset.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the --dataset.")] = "test",
    limit: Annotated[Optional[str], typer.Option("--limit", "-n", metavar="N|all", show_default=False, help=f"Score N images of the split (a seeded random subset; 1 to the split's size), or all of them. Default: {DEFAULT_LIMIT}, a first look; after its first maps the command says about how long the run takes here.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", show_default=False, help=_MAPS_HELP)] = None,
    target_class: Annotated[str, typer.Option("--class", help="The class whose probability is measured and whose logit the maps explain: a name, an index, or 'predicted' (each image's own).")] = "predicted",
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", show_default=False, help="The layer Grad-CAM weighs. Default: the last conv layer.")] = None,
    baseline: Annotated[str, typer.Option("--baseline", help="What removed pixels become in deletion, and the image insertion starts from: blur (the input blurred by a Gaussian of sigma = width / 16, 2 px at 32 x 32) or zero (0 in the model's input, the training data's mean colour for standardized input).")] = "blur",
    steps: Annotated[int, typer.Option("--steps", help="Deletion and insertion steps: the curves are measured at 0, 1/steps, ..., 1 of the pixels; 1 to the pixels of the model's input.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random map, the order of tied pixels, ROAD's imputation noise, the --limit subset and the bootstrap intervals.")] = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", show_default=False, help="Images per batch, 1 to the images scored (each is perturbed and scored 2 + 36 times per map). Default: 250, or all the images when fewer.")] = None,
    precision: Annotated[str, typer.Option("--precision", help="Autocast of the forward passes that score perturbed images: auto (bf16 where the CPU or GPU computes it natively), fp32, bf16 or fp16 (CUDA only). Maps are always computed in fp32.")] = "auto",
    device: Device = "auto",
    out: Annotated[Path, out_option("The chart of the mean curves (PNG).", default_shown=True)] = Path("faithfulness.png"),
    force: Force = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    threads: Threads = None,
    method_settings: dict | None = None,
):
    """Which saliency map points at what the model uses? Scores each map by deletion and insertion AUC and by ROAD, and writes a chart of the mean curves.

    Each image's pixels are removed, or put back, in the order of a map, most relevant first, and the probability of the explained class is measured: deletion and insertion AUC (Petsiuk et al., 2018) and ROAD, most and least relevant first, with noisy linear imputation (Rong et al., 2022), for every saliency method and two maps that know nothing of the model (random, Sobel edges). Prints each metric's mean and 95 % bootstrap interval over images. Before scoring, it says how many images it scores and, timing the maps after the first (which pays the warm-up), about how long that takes.

    Examples: [bold]allconv faithfulness[/bold] (the bundled model on a few of the sample's test images) ·
    [bold]allconv faithfulness --limit all[/bold] (all 1,000) ·
    [bold]allconv faithfulness --limit 100 --methods guided,gradcam,sobel[/bold] ·
    [bold]allconv faithfulness cat.png dog.png --baseline zero --json[/bold]
    """
    with user_errors():
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {out} must end in .png")
        if images and (limit is not None or data_dir is not None):
            raise ValueError("--limit and --data-dir choose images of a data split: drop them, or drop the IMAGES")
        count = _count(limit)
        from allconv_cli.cpu_threads import use_threads
        from allconv_cli.device import resolve_device
        from allconv_cli.explain import faithfulness as faith
        from allconv_cli.explain import figures, perturbation
        from allconv_cli.files.loading import load_checkpoint
        from allconv_cli.util import atomic_write

        method_list = check_methods(methods.split(",") if methods else None, model_free=True)
        perturbation.check_baseline(baseline)
        dev = resolve_device(device)
        use_threads(threads)
        loaded = load_checkpoint(checkpoint, model, dev)
        what = ("image file", "") if images else ("image", f" of {dataset} {split}")  # (noun, where from)
        ready, progress, stop = _reporting(out, force, quiet, what, len(method_list))
        try:
            result = faith.faithfulness(loaded, images, dataset=dataset, split=split, data_dir=data_dir, count=count,
                                        methods=method_list, settings=method_settings,
                                        target_class=target_class, cam_layer=layer,
                                        baseline=baseline, steps=steps, seed=seed, precision=precision,
                                        batch_size=batch_size, ready=ready, progress=progress)
        finally:
            stop()
        title = (f"{loaded.name} ({loaded.source}) on {result.source}; {result.selection}; {baseline} baseline, "
                 f"seed {seed}, {result.precision}")
        chart = figures.faithfulness_chart(result, title)
        atomic_write(out, lambda tmp: tmp.write_bytes(chart))
    rows = result.table()
    if as_json:
        typer.echo(json.dumps(_report(rows, result, loaded, out), indent=2))
        return
    _print_table(rows, result, out)


def _count(limit: str | None) -> int | None:
    """--limit's text -> images to score (None: all of them)."""
    if limit is None:
        return DEFAULT_LIMIT
    if limit.strip().lower() == "all":
        return None
    try:
        return int(limit)
    except ValueError:
        raise ValueError(f"--limit takes a number of images or all, got {limit!r}") from None


def _reporting(out: Path, force: bool, quiet: bool, what: tuple[str, str], maps: int):
    """-> (ready, progress, stop) for the library: ``ready`` refuses an existing --out (every input
    has been read and checked by then) and says how many images will be scored; ``progress``
    drives the bar and, at its second report, says about how long the whole run takes: timed from
    the first report, since the first maps pay the warm-up (allocations, kernels chosen)."""
    bar, stop = progress_bar("scoring maps", quiet)
    run = {}  # images to score and available, when scoring started, the first report (time, maps), estimated
    def say(line: str):
        if not quiet:
            typer.echo(line, err=True)

    def ready(count: int, available: int):
        refuse_existing([out], force)
        run.update(count=count, available=available, started=time.perf_counter(), first=None, estimated=False)
        rest = f" (--limit all scores all {available:,})" if count < available else ""
        say(f"scoring {plural(count, what[0])}{what[1]}{rest}, {plural(maps, 'map')} each")

    def progress(done: int, total: int):
        if bar is not None:
            bar(done, total)
        now = time.perf_counter()
        if run["first"] is None:
            run["first"] = (now, done)
        elif not run["estimated"] and done < total:
            run["estimated"] = True
            per_map = (now - run["first"][0]) / (done - run["first"][1])  # warm maps only
            elapsed = now - run["started"]
            also = f"; all {run['available']:,} would take about {duration(run['available'] * maps * per_map)}" \
                if run["count"] < run["available"] else ""
            say(f"scored {done} of {total} maps in {duration(elapsed)}: about "
                f"{duration(elapsed + per_map * (total - done))} in all on this machine{also}")

    return ready, progress, stop


def _report(rows: list[dict], result, loaded, out: Path) -> dict:
    """What --json prints: the table, the mean curves and every image's scores."""
    scores = result.scores()
    return {
        "model": loaded.name, "weights": loaded.source, "images": result.source, "selection": result.selection,
        "baseline": result.baseline, "steps": result.steps, "seed": result.seed, "precision": result.precision,
        "cam_layer": result.cam_layer, "settings": result.settings, "seconds": round(result.seconds, 2), "table": rows,
        "fractions": {metric: result.positions(metric) for metric in _COLUMNS},
        "mean_curves": {m: {k: c.mean(0).tolist() for k, c in curves.items()} for m, curves in result.curves.items()},
        "per_image": {"names": result.names, "classes": result.classes.tolist(),
                      "labels": None if result.labels is None else result.labels.tolist(),
                      "scores": {m: {k: v.tolist() for k, v in s.items()} for m, s in scores.items()}},
        "out": str(out)}


def _print_table(rows: list[dict], result, out: Path):
    from rich import box
    from rich.table import Table

    table = Table(title=f"faithfulness on {result.source} ({result.selection}; {result.baseline} baseline, "
                  f"{result.precision}): mean over images [95 % bootstrap interval]", box=box.SIMPLE_HEAD)
    table.add_column("method")
    for column in _COLUMNS.values():
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["method"], *(f"{row[k]:.3f} [{row[f'{k}_low']:.3f}, {row[f'{k}_high']:.3f}]"
                                       for k in _COLUMNS))
    console = make_console(False)
    console.print(table)
    console.print("deletion and insertion: area under the class probability over the share of pixels removed or "
                  "inserted, most relevant first; ROAD: the mean probability with 10 % to 90 % of the pixels imputed. "
                  "↓: lower is more faithful; ↑: higher.")
    console.print(f"wrote {out} in {duration(result.seconds)}")
