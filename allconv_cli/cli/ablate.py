"""allconv ablate: the paper's Table 3 as a resumable set of runs."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import (
    EXIT_FAILED,
    EXIT_SIGNAL,
    duration,
    make_console,
    parse_numbers,
    user_errors,
)


def ablate(
    family: Annotated[Optional[str], typer.Option(help="a, b or c: the four models of that block of Table 3.", show_default=False)] = None,
    models: Annotated[Optional[str], typer.Option("--models", help="Comma-separated names or globs, e.g. 'all-cnn-*,model-c', or 'all': Table 3's twelve networks.", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="The protocol every model is trained with (see 'allconv train --help').", show_default=False)] = None,
    lr_grid: Annotated[Optional[str], typer.Option("--lr-grid", help="'paper' for {0.25, 0.1, 0.05, 0.01}, or comma-separated rates; picked on --val-fraction. Default: the preset's one rate.", show_default=False)] = None,
    seeds: Annotated[str, typer.Option(help="How many seeds, e.g. 3 (seeds 0, 1 and 2), or which, e.g. 0,4,7.")] = "1",
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Share of train held out to pick the rate. Default: 0.1 with a grid of several rates, else the preset's.", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs. Default: the preset's.", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Data set. Default: the preset's.", show_default=False)] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder of the data set.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Batch size. Default: the preset's.", show_default=False)] = None,
    train_limit: Annotated[Optional[int], typer.Option("--train-limit", help="Use at most this many training images.", show_default=False)] = None,
    test_limit: Annotated[Optional[int], typer.Option("--test-limit", help="Use at most this many test images.", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (the default), cpu, cuda or cuda:N.", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (the default: bf16 autocast where the CPU or GPU computes bf16 natively, else fp32), fp32, bf16 or fp16 (CUDA only).", show_default=False)] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Runs at once. Default: 4 per GPU on CUDA (4 runs at once each trained at one run's speed on an H200), else 1. A run starts on the GPU where one has just ended.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The ablation folder; the same command continues it.")] = Path("runs/ablation"),
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="List the runs, the images they train on and an estimate of the time (from one measured training step of each model), then stop; reads no data and writes nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress on stderr (there is none either when stderr is not a terminal).")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the table (with --dry-run: the plan) as JSON.")] = False,
):
    """Reproduce the paper's ablation (Table 3): train each model under one protocol, optionally over the paper's learning-rate grid (picked on a validation split, never the test set) and several seeds, and write the table (Markdown, CSV, JSON) and a bar chart beside the paper's. Writes everything in --out: ablation.json (the plan), one run folder per model, rate and seed, table.md, table.csv, table.json and chart.png. Interrupted? Run the same command again: finished runs are kept, others resume.

    Examples: [bold]allconv ablate --family c --preset paper-cifar10 --lr-grid paper --seeds 3[/bold] · [bold]allconv ablate --models all-cnn-c,model-c --preset smoke --seeds 2 --out runs/try[/bold] · [bold]allconv ablate --family c --preset paper-cifar10 --dry-run[/bold]
    """
    with user_errors():
        from allconv_cli import ablate as ablation
        from allconv_cli.train import settings as configuration
        from allconv_cli.train.loop import TrainingDiverged, TrainingStopped

        names = ablation.select_models(family, models.split(",") if models else None)
        grid = parse_numbers(lr_grid, "--lr-grid", float, ablation.PAPER_GRID) if lr_grid else None
        seed_list = ablation.seed_list(parse_numbers(seeds, "--seeds", int))
        if grid is not None and len(grid) > 1 and val_fraction is None:
            val_fraction = 0.1
        base = configuration.resolve(preset, epochs=epochs, dataset=dataset, data_dir=data_dir,
                                     batch_size=batch_size, train_limit=train_limit, test_limit=test_limit,
                                     device=device, precision=precision, val_fraction=val_fraction)
        grid = grid or [base.lr]
        errors = make_console(True)
        show = not quiet and errors.is_terminal
        if dry_run:
            _print_plan(base, names, grid, seed_list, out, as_json, errors if show else None)
            return
        progress = _printed_progress(errors) if show else None
        try:
            rows = ablation.ablate(base, names, grid, seed_list, out, jobs, progress)
        except (KeyboardInterrupt, TrainingStopped) as stop:  # a stopped run keeps its checkpoint
            typer.echo(f"interrupted; run the same command again to continue {out}", err=True)
            raise typer.Exit(EXIT_SIGNAL.get(getattr(stop, "signum", 2), 130)) from None
        except TrainingDiverged as err:  # the other runs stopped at their checkpoints
            typer.echo(f"Error: {err}; the other runs stopped resumably: run the same command again to continue",
                       err=True)
            raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = make_console(False)
    table = (out / "table.md").read_text()
    if console.is_terminal:
        from rich.markdown import Markdown

        console.print(Markdown(table))
    else:  # the Markdown source itself reads well in a file and pastes into a README
        typer.echo(table, nl=False)
    console.print(f"tables and chart: {out}/table.md, table.csv, table.json, chart.png")


def _print_plan(base, names: list[str], grid: list[float], seeds: list[int], out: Path, as_json: bool, status):
    """--dry-run: the runs, the images they train on and the time one measured step per model gives;
    ``status`` (a console, or None) shows that the step is being timed."""
    from allconv_cli import ablate as ablation

    sizes = ablation.split_sizes(base)
    runs = ablation.planned_runs(names, grid, seeds)
    total = ablation.cost(base, names, grid, seeds, sizes["train"])
    with status.status("timing one training step of each model", transient=True) if status \
            else contextlib.nullcontext():
        estimate = ablation.estimate_seconds(base, names, grid, seeds, sizes)
    if as_json:
        typer.echo(json.dumps({**total, "images": sizes, "estimate": estimate, "plan": runs}, indent=2))
        return
    for i, run in enumerate(runs, 1):
        typer.echo(f"{i:3d}. {run['model']}  lr {run['lr']}  seed {run['seed']}  "
                   f"{base.epochs} epochs x {sizes['train']:,} images")
    typer.echo(f"{total['runs']} runs, {total['epochs']:,} epochs, "
               f"{total['training_images']:,} training images in all -> {out}")
    speeds = ", ".join(f"{m} {e['images_per_s']:,.0f} img/s" for m, e in estimate["per_model"].items())
    typer.echo(f"estimated time: {duration(estimate['seconds'])} on {estimate['device_name']} "
               f"({estimate['device']}, {estimate['precision']}; measured {speeds}: {estimate['measured']})")


def _printed_progress(errors):
    """A line on stderr as each run starts, and as it ends or is found finished already."""
    def progress(event, run, result=None):
        label = f"{run.model} lr {run.lr:g} seed {run.seed}"
        if event == "run":
            errors.print(f"training {label} ...")
            return
        verb = "kept" if event == "skip" else "done"
        errors.print(f"{verb} {label}: test error {result['test_error']:.2f} %"
                     + (f", val error {result['val_error']:.2f} %" if result["val_error"] is not None else ""))

    return progress
