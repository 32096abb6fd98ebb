"""allconv train: one run from the defaults, a preset and the options, with progress bars."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import (
    AsJson,
    EXIT_FAILED,
    EXIT_SIGNAL,
    Force,
    Threads,
    duration,
    make_console,
    out_option,
    parse_duration,
    user_errors,
)
from allconv_cli.cli.options import given_settings, takes_settings
from allconv_cli.util import plural


class _TrainProgress:
    """Rich progress bars for the trainer's progress events: epochs, and batches of the epoch."""

    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = console
        # transient: the bars vanish when they stop, so a log keeps only the lasting lines
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                             transient=True)
        self.epochs = self.batches = None

    def __call__(self, event, **fields):
        if event == "start":
            config = fields["config"]
            self.console.print(f"[bold]{fields['network']}[/bold] on {config.dataset}: "
                               f"{plural(fields['examples'], 'training image')}, {plural(fields['steps'], 'step')} "
                               f"an epoch, {fields['device']}{_processes(fields)}, {fields['threads']}, {config.precision} "
                               f"-> {fields['run_dir']}")
            self.console.print(_deviations_line(config), markup=False)
            self.bars.start()
            self.epochs = self.bars.add_task("epochs", total=config.epochs, completed=fields["start_epoch"], info="")
            self.batches = self.bars.add_task("batches", total=fields["steps"], info="")
        elif event == "step":
            self.bars.update(self.batches, completed=fields["step"], description=f"epoch {fields['epoch'] + 1}",
                             info=f"loss {fields['loss']:.3f}  acc {fields['accuracy']:.1f} %  "
                                  f"{fields['images_per_s']:,.0f} img/s  lr {fields['lr']:.4f}")
        elif event == "epoch":
            m = fields["metrics"]
            evaluated = next((f"{s} error {m[f'{s}_top1_error']:.2f} %" for s in ("val", "test")
                              if f"{s}_top1_error" in m), "")
            self.bars.update(self.epochs, completed=m["epoch"], info=evaluated)
            self.bars.reset(self.batches)
            # one lasting line per epoch: the bars vanish, and a log that is not a terminal gets no bars
            self.console.print(f"epoch {m['epoch']}/{fields['epochs']}: train loss {m['train_loss']:.3f}, "
                               f"accuracy {m['train_accuracy']:.1f} %, {m['images_per_s']:,.0f} img/s, "
                               f"{m['seconds']:,.0f} s" + (f"; {evaluated}" if evaluated else ""))

    def stop(self):
        if self.bars.live.is_started:  # stopping bars never started prints an empty line
            self.bars.stop()


def _processes(fields: dict) -> str:
    """' x 4 (32 images a process, SyncBatchNorm)' under DDP; '' for one process."""
    if fields["world"] == 1:
        return ""
    synced = ", SyncBatchNorm" if fields["sync_batch_norm"] else ""
    return f" x {fields['world']} ({plural(fields['batch_per_process'], 'image')} a process{synced})"


@takes_settings()
def train(
    out: Annotated[Optional[Path], out_option("Run folder. Default: runs/MODEL-DATASET-TIME.")] = None,
    force: Force = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder where it stopped.", show_default=False)] = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", help="Stop, resumably, after this many epochs of this call.", show_default=False)] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time-limit", metavar="DURATION", help="Stop, resumably, within this time (e.g. 3h50m, 90min, 1:30:00); exit 124.", show_default=False)] = None,
    as_json: AsJson = False,
    threads: Threads = None,
    **settings,
):
    """Train a model of the paper, by the fast recipe (its deviations from the paper named in the run's second line) or a preset. Writes a run folder: weights, settings, metrics, curves and a resumable state. Every setting, in detail: docs/training.md.

    Examples: [bold]allconv train --epochs 3 --out runs/first[/bold] (offline, on the bundled sample) ·
    [bold]allconv train --preset paper-cifar10 --data-dir data[/bold] ·
    [bold]allconv train --resume runs/first[/bold] ·
    [bold]torchrun --nproc-per-node 2 --no-python allconv train --preset fast-cifar10[/bold]
    """
    with user_errors():
        from allconv_cli import train as trainer
        from allconv_cli.train.settings import resolve

        given = given_settings(settings)
        seconds = parse_duration(time_limit) if time_limit is not None else None
        # stdout carries the results alone (the table, or --json), so that a pipe gets them clean
        progress = _TrainProgress(make_console(to_stderr=True))
        try:
            if resume is not None:  # the run's own settings; the trainer refuses any other change
                unused = {k: True for k, v in (("out", out), ("force", force)) if v}
                summary = trainer.resume(resume, progress, stop_after, seconds, threads, **given, **unused)
            else:
                config = resolve(given.pop("preset", None), **given)
                summary = trainer.train(config, out or trainer.default_run_dir(config), progress=progress,
                                        stop_after=stop_after, replace=force, time_limit=seconds, threads=threads)
        except trainer.TrainingStopped as stop:
            progress.stop()
            typer.echo(str(stop), err=True)
            raise typer.Exit(EXIT_SIGNAL.get(stop.signum, 1)) from None
        except trainer.TrainingDiverged as err:
            progress.stop()
            typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(EXIT_FAILED) from None
        finally:
            progress.stop()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)




def _deviations_line(config) -> str:
    """The run's second line: where its recipe departs from the paper's, and how to get the paper's."""
    from allconv_cli.train.settings import deviations

    found = deviations(config)
    if not found:
        return "The paper's recipe (Section 3.2): no deviation."
    return (f"Deviations from the paper's recipe (Section 3.2): {', '.join(found)}. "
            "The paper's own: --preset paper-cifar10 (or paper-cifar100, paper-cifar10-aug); its network and "
            "optimizer on any data: --preset faithful.")


def _print_summary(summary: dict):
    """The table and the run folder on stdout; a note that the run has not begun to learn on stderr."""
    from rich import box
    from rich.table import Table

    last = summary["last"]
    table = Table(title=f"{summary['network']} on {summary['dataset']}: "
                  f"{summary['epochs_done']}/{plural(summary['epochs'], 'epoch')} in {summary['seconds']:.0f} s",
                  box=box.SIMPLE_HEAD)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("train loss", f"{last['train_loss']:.4f}")
    table.add_row("train accuracy %", f"{last['train_accuracy']:.2f}")
    table.add_row("images/s (last epoch)", f"{last['images_per_s']:,.0f}")
    for split in ("val", "test"):
        if f"{split}_top1_error" in last:
            table.add_row(f"{split} top-1 error %", f"{last[f'{split}_top1_error']:.2f}")
            table.add_row(f"{split} top-5 error %", f"{last[f'{split}_top5_error']:.2f}")
    for split in ("val_tta", "test_tta"):
        if f"{split}_top1_error" in last:
            table.add_row(f"{split.replace('_', ' with ')} top-1 error %", f"{last[f'{split}_top1_error']:.2f}")
    if "test" in summary:
        table.add_row("test top-1 error % (final)", f"{summary['test']['top1_error']:.2f}")
    if "test_tta" in summary:
        table.add_row("test with tta top-1 error % (final)", f"{summary['test_tta']['top1_error']:.2f}")
    if "target" in summary:
        reached = summary["target"]
        table.add_row(f"{reached['accuracy']:g} % reached at epoch", f"{reached['epoch']} "
                      f"({duration(reached['wall_seconds'])})")
    if summary["paper_error"] is not None:
        table.add_row("paper's error %", f"{summary['paper_error']:.2f}")
    console = make_console()
    console.print(table)
    if "not_learning" in summary:
        make_console(to_stderr=True).print(f"Note: {summary['not_learning']}", markup=False)
    state = "finished" if summary["finished"] else f"stopped; continue with: allconv train --resume {summary['run_dir']}"
    console.print(f"run folder: {summary['run_dir']} ({state})")
