"""allconv ablate: the paper's Table 3 as a resumable set of runs."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import (
    AsJson,
    EXIT_FAILED,
    EXIT_SIGNAL,
    Quiet,
    duration,
    make_console,
    out_option,
    parse_duration,
    parse_numbers,
    user_errors,
)
from allconv_cli.cli.options import given_settings, takes_settings


@takes_settings(leave_out=("model", "seed"))
def ablate(
    family: Annotated[Optional[str], typer.Option(help="a, b or c: the four models of that block of Table 3.", show_default=False)] = None,
    models: Annotated[Optional[str], typer.Option("--models", help="Comma-separated names or globs, e.g. 'all-cnn-*,model-c', or 'all': Table 3's twelve networks.", show_default=False)] = None,
    lr_grid: Annotated[Optional[str], typer.Option("--lr-grid", help="'paper' for {0.25, 0.1, 0.05, 0.01}, or comma-separated rates; picked on --val-fraction (0.1 unless given). Default: the one rate of --lr or the preset.", show_default=False)] = None,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", metavar="KEY=V1,V2", help="Vary any training setting: KEY=V1,V2 (repeatable; every combination is trained, a list as 200:250:300), e.g. --grid batch_size=128,256 --grid weight_init=xavier,caffe-xavier. Each combination gets its run folders and its rows in the table and chart.", show_default=False)] = None,
    seeds: Annotated[str, typer.Option(help="How many seeds, e.g. 3 (seeds 0, 1 and 2), or which, e.g. 0,4,7.")] = "1",
    jobs: Annotated[Optional[int], typer.Option(help="Runs at once. Default: 4 per GPU on CUDA (4 runs at once each trained at one run's speed on an H200), else 1. A run starts on the GPU where one has just ended. More than the machine runs at once: a warning, then the work.", show_default=False)] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", metavar="K/N", help="K/N: train the K-th of N shares of the runs (dealt round-robin), then what shares that finished left waiting on a rate grid, so that N jobs (a job array, N machines) with the same --out split the ablation; the last to finish writes the table.", show_default=False)] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time-limit", metavar="DURATION", help="Stop every run, resumably, before this much wall-clock time has passed (e.g. 3h50m, 90min, 1:30:00), exit 124; the same command continues.", show_default=False)] = None,
    out: Annotated[Path, out_option("The ablation folder; the same command continues it.", default_shown=True)] = Path("runs/ablation"),
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="Check everything a run checks, list the runs, the images they train on and an estimate of the time (from one measured training step), then stop; reads no data and writes nothing.")] = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
    **settings,
):
    """Reproduce the paper's ablation (Table 3), or compare recipes: train each model under one protocol (a preset and any training setting), optionally over the paper's learning-rate grid (picked on a validation split, never the test set), over a --grid of other settings and over several seeds, and write the table (Markdown, CSV, JSON) and a bar chart beside the paper's. Writes everything in --out: ablation.json (the plan), one run folder per model, combination, rate and seed, table.md, table.csv, table.json and chart.png. Interrupted? Run the same command again: finished runs are kept, others resume.

    Examples: [bold]allconv ablate --family c --preset paper-cifar10 --lr-grid paper --seeds 3[/bold] · [bold]allconv ablate --models all-cnn-c --preset paper-cifar10 --grid batch_size=128,256 --time-limit 3h50m[/bold] · [bold]allconv ablate --models all-cnn-c,model-c --preset smoke --seeds 2 --out runs/try[/bold] · [bold]allconv ablate --family c --preset paper-cifar10 --dry-run[/bold]
    """
    with user_errors():
        import time

        from allconv_cli import ablate as ablation
        from allconv_cli.train import TIME_LIMIT, TrainingDiverged, TrainingStopped
        from allconv_cli.train import settings as configuration

        started = time.monotonic()
        names = ablation.select_models(family, models.split(",") if models else None)
        rates = parse_numbers(lr_grid, "--lr-grid", float, ablation.PAPER_GRID) if lr_grid else None
        seed_list = ablation.seed_list(parse_numbers(seeds, "--seeds", int))
        settings_grid = ablation.parse_grid(grid or [])
        index, count = ablation.parse_shard(shard) if shard is not None else (1, 1)
        deadline = started + parse_duration(time_limit) if time_limit is not None else None
        given = given_settings(settings)
        if rates is not None and len(rates) > 1:
            given.setdefault("val_fraction", 0.1)
        preset = given.pop("preset", None)
        base = configuration.resolve(preset, **given)
        networks = {name: configuration.model_network(preset, given, name) for name in names}
        rates = rates or [base.lr]
        errors = make_console(True)
        show = not quiet and errors.is_terminal
        if dry_run:
            _print_plan(base, names, rates, seed_list, settings_grid, out, jobs, as_json, errors, show, networks)
            return
        progress = _printed_progress(errors) if show else None
        try:
            rows = ablation.ablate(base, names, rates, seed_list, out, jobs, progress, settings_grid,
                                   ablation.Share(index, count, deadline), warn=errors.print, networks=networks)
        except (KeyboardInterrupt, TrainingStopped) as stop:  # a stopped run keeps its checkpoint
            signum = getattr(stop, "signum", 2)
            cause = "time limit reached" if signum == TIME_LIMIT else "interrupted"
            typer.echo(f"{cause}; run the same command again to continue {out}", err=True)
            raise typer.Exit(EXIT_SIGNAL.get(signum, 130)) from None
        except TrainingDiverged as err:  # the other runs stopped at their checkpoints
            typer.echo(f"Error: {err}; the other runs stopped resumably: run the same command again to continue",
                       err=True)
            raise typer.Exit(EXIT_FAILED) from None
    if rows is None:
        typer.echo(f"shard {index}/{count} is done; other shards' runs are not finished yet: the last shard to "
                   f"finish (or the same command run again once they are) writes the table in {out}", err=True)
        return
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


def _print_plan(base, names: list[str], grid: list[float], seeds: list[int], settings_grid: dict, out: Path,
                jobs: int | None, as_json: bool, errors, show: bool, networks: dict[str, dict]):
    """--dry-run: the checks of a real run, then the runs, the images they train on and the time
    one measured step per combination gives; ``errors`` (shown if ``show``) says a step is timed."""
    from allconv_cli import ablate as ablation

    prepared = ablation.prepare(base, names, grid, seeds, out, jobs, settings_grid, networks)
    if prepared["warning"]:
        errors.print(prepared["warning"])
    configs = prepared["configs"]
    sizes = [ablation.split_sizes(config) for config in configs]
    combos = ablation.variants(settings_grid)
    runs = ablation.planned_runs(names, grid, seeds, combos)
    total = ablation.cost(configs, grid, seeds, sizes)
    with errors.status("timing a training step", transient=True) if show else contextlib.nullcontext():
        estimate = ablation.estimate_seconds(configs, grid, seeds, sizes)
    if as_json:
        typer.echo(json.dumps({**total, "images": sizes[0], "estimate": estimate, "plan": runs}, indent=2))
        return
    # configs and sizes are in the order of the units: each model under each combination
    units = {(m, ablation.variant_name(v)): i for i, (m, v) in enumerate((m, v) for m in names for v in combos)}
    for i, run in enumerate(runs, 1):
        unit = units[(run["model"], run.get("settings", ""))]
        typer.echo(f"{i:3d}. {run['model']}  {run.get('settings', '')}{'  ' if 'settings' in run else ''}"
                   f"lr {run['lr']}  seed {run['seed']}  "
                   f"{counted(configs[unit].epochs, 'epoch')} x {counted(sizes[unit]['train'], 'image')}")
    typer.echo(f"{counted(total['runs'], 'run')}, {counted(total['epochs'], 'epoch')}, "
               f"{counted(total['training_images'], 'training image')} in all -> {out}")
    speeds = ", ".join(f"{m} {e['images_per_s']:,.0f} img/s" for m, e in estimate["per_model"].items())
    typer.echo(f"estimated time: {duration(estimate['seconds'])} on {estimate['device_name']} "
               f"({estimate['device']}, {estimate['precision']}; {speeds}: {estimate['measured']})")


def counted(number: int, thing: str) -> str:
    """(1, 'epoch') -> '1 epoch'; (1024, 'image') -> '1,024 images'."""
    return f"{number:,} {thing}{'' if number == 1 else 's'}"


def _printed_progress(errors):
    """A line on stderr as each run starts, and as it ends or is found finished already."""
    from allconv_cli.ablate import variant_name

    def progress(event, run, result=None):
        label = f"{run.model}{' ' + variant_name(run.variant) if run.variant else ''} lr {run.lr:g} seed {run.seed}"
        if event == "run":
            errors.print(f"training {label} ...")
            return
        verb = "kept" if event == "skip" else "done"
        errors.print(f"{verb} {label}: test error {result['test_error']:.2f} %"
                     + (f", val error {result['val_error']:.2f} %" if result["val_error"] is not None else ""))

    return progress
