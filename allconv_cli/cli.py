"""The ``allconv`` command: a table of contents over the library.

Each command reads its options, calls one library function and prints. Heavy imports (torch,
timm) happen inside command bodies so that ``allconv --help`` and completion stay fast.
Library errors (ValueError, OSError) become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli import __version__

app = typer.Typer(
    name="allconv",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_USAGE = 2  # bad names, options or input files


@contextlib.contextmanager
def user_errors():
    """Turn the library's ValueError / OSError into one line and exit code 2, no traceback."""
    try:
        yield
    except (ValueError, OSError) as err:
        message = str(err) or type(err).__name__
        if isinstance(err, OSError) and err.strerror:  # "[Errno 17] ..." tells a user nothing; the path does
            message = err.strerror + (f": {err.filename}" if err.filename else "")
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # always one line
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _version(value: bool):
    if value:
        typer.echo(f"allconv {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                          help="Print the version and exit.")] = False,
):
    """The All Convolutional Net (Springenberg et al., 2015): train, evaluate, ablate, export and visualize the paper's networks. Results go to stdout (tables, or JSON with --json), progress and errors to stderr.

    Example: [bold]allconv models[/bold]
    """


@app.command()
def models(
    name: Annotated[Optional[str], typer.Argument(help="Show one model's layers (e.g. all-cnn-c) instead of the registry table.", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", "-k", help="Classes K for the counts. Default: the model's own, 10 or 1000.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON instead of a table.")] = False,
):
    """List the registry: exact parameter counts beside the paper's, the paper's error, input size and layer names; or, given a NAME, that model's layers with their output shapes. Writes no file.

    Examples: [bold]allconv models[/bold] · [bold]allconv models all-cnn-c --num-classes 100[/bold]
    """
    with user_errors():
        from allconv_cli.models import describe, pretrained_names

        rows = describe(name, num_classes=num_classes)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich import box
    from rich.table import Table

    if name is None:
        table = Table(title="Exact parameters (weights + biases) beside the paper's",
                      box=box.SIMPLE_HEAD)
        table.add_column("name", no_wrap=True)
        for column in ("params", "paper", "err %"):
            table.add_column(column, justify="right", no_wrap=True, min_width=9)
        table.add_column("input", no_wrap=True)
        table.add_column("layers", no_wrap=True)
        for row in rows:
            table.add_row(row["name"], f"{row['params']:,}", row["paper_params"],
                          f"{next(iter(row['paper_error'].values())):.2f}",
                          "x".join(map(str, row["input_size"])),
                          f"{row['layer_names'][0]}..{row['layer_names'][-1]}")
    else:
        table = Table(box=box.SIMPLE_HEAD, title=f"{rows[0]['name']}: {rows[0]['params']:,} parameters, "
                      f"input {'x'.join(map(str, rows[0]['input_size']))}")
        for column in ("layer", "type", "output (C, H, W)", "params"):
            table.add_column(column, justify="right" if column == "params" else "left")
        for layer in rows[0]["layers"]:
            table.add_row(layer["name"], layer["type"], "x".join(map(str, layer["output"])),
                          f"{layer['params']:,}" if layer["params"] else "")
    console = _console(False)
    console.print(table)
    if name is None:
        console.print("err %: the paper's test error on CIFAR-10 without augmentation (ImageNet top-1 "
                      "for all-cnn-imagenet); --json lists every figure the paper reports.")
        for weights in pretrained_names():
            console.print(f"pretrained: {weights}, the bundled weights (All-CNN-C with BatchNorm): "
                          f"timm.create_model({weights.split('.')[0]!r}, pretrained=True)")


EXIT_FAILED = 1  # a run that diverged
EXIT_SIGNAL = {2: 130, 15: 143}  # SIGINT, SIGTERM: the shell's 128 + signal number


UNWRAPPED_WIDTH = 10_000  # columns when not a terminal: wide enough that no line is wrapped


def _console(to_stderr: bool = False):
    """A rich console on stdout (or stderr): the terminal's width on a terminal; in a file or a
    pipe, where rich would wrap at 80 columns, never wrapped, so no value or path is cut in two."""
    from rich.console import Console

    console = Console(stderr=to_stderr)
    if not console.is_terminal:
        console = Console(stderr=to_stderr, width=UNWRAPPED_WIDTH, soft_wrap=True)
    return console


def _progress_bar(description: str, quiet: bool):
    """A transient progress bar on stderr -> (callback(done, total), stop); no bar (callback None)
    with --quiet or when stderr is not a terminal, so logs and pipes get none."""
    console = _console(True)
    if quiet or not console.is_terminal:
        return None, lambda: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task(description, total=None)
    bar.start()
    return lambda done, total: bar.update(task, completed=done, total=total), bar.stop


def _duration(seconds: float) -> str:
    """3725 -> '1 h 02 min'; 200 -> '3 min 20 s'; 12.4 -> '12 s'."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class _TrainProgress:
    """Rich progress bars for the trainer's progress events: epochs, and batches of the epoch."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        # transient: the bars vanish when they stop, so a log keeps only the lasting lines
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                             transient=True)
        self.epochs = self.batches = None

    def __call__(self, event, **fields):
        if event == "start":
            config = fields["config"]
            self.console.print(f"[bold]{config.model}[/bold] on {config.dataset}: {fields['examples']:,} "
                               f"training images, {fields['steps']} steps an epoch, {fields['device']}"
                               f"{' x ' + str(fields['world']) if fields['world'] > 1 else ''}, {config.precision} "
                               f"-> {fields['run_dir']}")
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
        self.bars.stop()


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name, e.g. all-cnn-c (see 'allconv models'). Default: all-cnn-c.", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="sample (bundled; the default), cifar10, cifar100 or imagefolder.", show_default=False)] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder of the data set (CIFAR: torchvision's layout, downloaded there if missing; imagefolder: train/ and val/ or test/).", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="paper-cifar10, paper-cifar10-aug, paper-cifar100, paper-imagenet, fast-cifar10, cpu-cifar10, smoke, or a .toml path; options override its keys.", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs. Default: 30.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Global batch size, split over DDP processes. Default: 128.", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate. Default: 0.05.", show_default=False)] = None,
    momentum: Annotated[Optional[float], typer.Option(help="SGD momentum. Default: 0.9.", show_default=False)] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", metavar="", help="Nesterov momentum. Default: off.", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay. Default: 0.001, the paper's. With --optimizer muon it acts on the SGD parameters only (with --decay-all): Muon holds the conv weights' norm fixed.", show_default=False)] = None,
    schedule: Annotated[Optional[str], typer.Option(help="paper (x gamma at --milestones), cosine (the default), onecycle or constant.", show_default=False)] = None,
    milestones: Annotated[Optional[str], typer.Option(help="Comma-separated epochs for the paper schedule. Default: 200,250,300.", show_default=False)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear warm-up, in epochs. Default: 1.", show_default=False)] = None,
    crop: Annotated[Optional[int], typer.Option(help="Train on random crops of this side (px) in the first --crop-epochs epochs: cheaper steps, e.g. 24 of 32 px costs half. Default: 0, off.", show_default=False)] = None,
    crop_epochs: Annotated[Optional[int], typer.Option("--crop-epochs", help="How many of the first epochs train on --crop windows; the rest train at full size. Default: 0.", show_default=False)] = None,
    flips: Annotated[Optional[str], typer.Option(help="random (a coin per image and step; the default) or alternate (each image mirrored in every other epoch, from a random start).", show_default=False)] = None,
    weight_init: Annotated[Optional[str], typer.Option("--weight-init", help="How the convs start: xavier-open (the default: Xavier-uniform, biases 0.1, the class conv's 1.0 so that its ReLU starts open), xavier (biases 0.1 everywhere), kaiming (He normal, biases 0) or lsuv (orthogonal, then each conv scaled to unit output variance on training images).", show_default=False)] = None,
    whiten: Annotated[Optional[str], typer.Option(help="off (the default), init (the first conv starts as the whitening of the training images' patches) or frozen (and is never trained).", show_default=False)] = None,
    dirac: Annotated[Optional[bool], typer.Option("--dirac/--no-dirac", metavar="", help="Start the convs after the first (not the class conv) with identity filters. Default: off.", show_default=False)] = None,
    decay_all: Annotated[Optional[bool], typer.Option("--decay-all/--decay-weights-only", metavar="", help="Weight decay on every parameter (the default), or on conv weights only (not biases and BatchNorm).", show_default=False)] = None,
    init: Annotated[Optional[str], typer.Option(help="Start from these weights (a run folder or allconv .safetensors) and their preprocessing, with a fresh optimizer and schedule: fine-tuning, or a further cycle.", show_default=False)] = None,
    bn_momentum: Annotated[Optional[float], typer.Option("--bn-momentum", help="Weight of each batch in BatchNorm's running statistics (torch's momentum). Default: 0.1.", show_default=False)] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd (the default; --lr, --momentum, --nesterov) or muon (needs --batch-norm): the conv weights then step by Muon's orthogonalized momentum at --muon-lr, the rest by SGD as before.", show_default=False)] = None,
    muon_lr: Annotated[Optional[float], typer.Option("--muon-lr", help="With --optimizer muon: the conv weights' peak learning rate, the share of each conv's weight norm that one step moves (the schedule applies). Default: 0.05, the best of 0.03, 0.05 and 0.07 for All-CNN-C in ten CIFAR-10 epochs.", show_default=False)] = None,
    muon_momentum: Annotated[Optional[float], typer.Option("--muon-momentum", help="With --optimizer muon: the conv weights' Nesterov momentum. Default: 0.6, airbench's.", show_default=False)] = None,
    bias_lr_scale: Annotated[Optional[float], typer.Option("--bias-lr-scale", help="Learning rate of the biases (BatchNorm shifts, conv biases) as a multiple of --lr; their weight decay per step stays the same. Default: 1.", show_default=False)] = None,
    label_smoothing: Annotated[Optional[float], typer.Option("--label-smoothing", help="Label smoothing. Default: 0.", show_default=False)] = None,
    lookahead_decay: Annotated[Optional[float], typer.Option("--lookahead-decay", help="Lookahead (airbench's): every 5 steps the weights and BatchNorm statistics are pulled toward a slow copy of themselves, training goes on from that copy, and the pull grows as the cube of the run's progress to this per-step decay at its end, e.g. 0.95. Default: 0, off.", show_default=False)] = None,
    ema_decay: Annotated[Optional[float], typer.Option("--ema-decay", help="Per-step weight EMA decay, e.g. 0.999. Default: 0, off.", show_default=False)] = None,
    augment: Annotated[Optional[str], typer.Option(help="none, paper (flips and translations of up to --shift px; the default) or strong (adds CutMix/Mixup).", show_default=False)] = None,
    shift: Annotated[Optional[int], typer.Option(help="How far (px) the paper's translations reach each way. Default: 5, the paper's.", show_default=False)] = None,
    preprocess: Annotated[Optional[str], typer.Option(help="standardize (per-channel mean and std; the default) or zca (the paper's GCN + ZCA).", show_default=False)] = None,
    batch_norm: Annotated[Optional[bool], typer.Option("--batch-norm/--no-batch-norm", metavar="", help="Deviation: BatchNorm after every conv. Default: off.", show_default=False)] = None,
    class_relu: Annotated[Optional[bool], typer.Option("--class-relu/--no-class-relu", metavar="", help="The paper's ReLU after the class conv. Default: on.", show_default=False)] = None,
    drop_input: Annotated[Optional[float], typer.Option("--drop-input", help="Dropout on the input; 0 turns it off. Default: the model's, 0.2 as in the paper.", show_default=False)] = None,
    drop_rate: Annotated[Optional[float], typer.Option("--drop-rate", help="Dropout after each pool or the conv replacing it. Default: the model's, 0.5 as in the paper.", show_default=False)] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Hold out this share of train for evaluation; test is then scored once at the end.", show_default=False)] = None,
    train_limit: Annotated[Optional[int], typer.Option("--train-limit", help="Use at most this many training images.", show_default=False)] = None,
    test_limit: Annotated[Optional[int], typer.Option("--test-limit", help="Use at most this many test images.", show_default=False)] = None,
    shuffle_labels: Annotated[Optional[bool], typer.Option("--shuffle-labels/--no-shuffle-labels", metavar="", help="Permute the training labels once, with the seed: a model for the data-randomization test of 'allconv sanity --against'. Default: off.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialization, order, augmentation and dropout, in [0, 2^63). Default: 0.", show_default=False)] = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic/--no-deterministic", metavar="", help="Deterministic kernels (slower on CUDA). Default: off.", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (the default), cpu, cuda or cuda:N.", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (the default: bf16 autocast where the CPU or GPU computes bf16 natively, else fp32), fp32, bf16 or fp16 (CUDA only, with a gradient scaler). Weights, optimizer state, BatchNorm statistics and the loss stay fp32.", show_default=False)] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", metavar="", help="channels_last memory format. Default: on.", show_default=False)] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", metavar="", help="torch.compile the training step. Default: off.", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers for large image folders. Default: 4.", show_default=False)] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate every N epochs; the last is always evaluated. Default: 1.", show_default=False)] = None,
    tta: Annotated[Optional[str], typer.Option(help="Test-time augmentation of the last epoch's evaluation and the final test, reported beside the plain figures: none (the default), flip or flip-shift (see allconv eval --tta).", show_default=False)] = None,
    target: Annotated[Optional[float], typer.Option(help="Stop once the evaluated top-1 accuracy (%, validation split if held out, else test) reaches this; every epoch is then evaluated, and the epoch and time are reported.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder. Default: runs/MODEL-DATASET-TIME.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace the run that --out already holds (otherwise refused).")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder exactly where it stopped; only --device and --workers may change.", show_default=False)] = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", help="Stop, resumably, after this many epochs of this call.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the summary as JSON on stdout; progress goes to stderr.")] = False,
):
    """Train a model of the paper: the paper's protocol (presets paper-*), the ten-epoch fast recipe (fast-cifar10) or your own settings. Writes a run folder with safetensors weights, the resolved settings, per-epoch metrics, learning curves and a resumable state, and holds a lock on it while it runs. Ctrl-C stops with a resumable checkpoint (exit 130; SIGTERM 143).

    Examples: [bold]allconv train --model all-cnn-c --dataset cifar100[/bold] ·
    [bold]allconv train --preset paper-cifar10 --data-dir data[/bold] ·
    [bold]allconv train --resume runs/all-cnn-c-cifar10-20261123-101500[/bold] ·
    [bold]torchrun --nproc-per-node 2 --no-python allconv train --preset fast-cifar10[/bold]
    """
    with user_errors():
        from allconv_cli import config as configuration
        from allconv_cli import train as trainer

        settings = {k: v for k, v in ctx.params.items() if k in configuration.FIELDS and k != "preset"}
        if milestones is not None:
            settings["milestones"] = _parse_numbers(milestones, "--milestones", int)
        given = [k for k, v in settings.items() if v is not None]
        if resume is not None:
            extra = [k for k in given if k not in trainer.RESUME_MAY_CHANGE] + [
                k for k, v in (("preset", preset), ("out", out), ("force", force)) if v]
            if extra:
                raise ValueError("--resume continues with the run's saved settings; drop "
                                 + ", ".join("--" + k.replace("_", "-") for k in extra))
            run_dir = resume
        else:
            config = configuration.resolve(preset, **settings)
            run_dir = out or trainer.default_run_dir(config)
        console = _console(as_json)
        progress = _TrainProgress(console)
        try:
            if resume is not None:
                summary = trainer.resume(resume, progress, stop_after, **{k: settings[k] for k in given})
            else:
                summary = trainer.train(config, run_dir, progress=progress, stop_after=stop_after, replace=force)
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
    _print_summary(console, summary)


def _print_summary(console, summary: dict):
    from rich import box
    from rich.table import Table

    last = summary["last"]
    table = Table(title=f"{summary['model']} on {summary['dataset']}: "
                  f"{summary['epochs_done']}/{summary['epochs']} epochs in {summary['seconds']:.0f} s",
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
                      f"({_duration(reached['wall_seconds'])})")
    if summary["paper_error"] is not None:
        table.add_row("paper's error %", f"{summary['paper_error']:.2f}")
    console.print(table)
    state = "finished" if summary["finished"] else f"stopped; continue with: allconv train --resume {summary['run_dir']}"
    console.print(f"run folder: {summary['run_dir']} ({state})")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder or an allconv .safetensors checkpoint.", show_default=False)],
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Data set. Default: the one it was trained on.", show_default=False)] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder of the data set. Default: the training run's.", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="test or train.")] = "test",
    tta: Annotated[str, typer.Option("--tta", help="Test-time augmentation: none, flip (average the predictions of each image and its mirror) or flip-shift (also both moved by one pixel down-right and up-left, weighted half).")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")] = 256,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate at most this many images (a fixed subset).", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast where the CPU or GPU computes bf16 natively, else fp32), fp32, bf16 or fp16 (CUDA only).")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The confusion-matrix PNG. Default: confusion-DATASET-SPLIT.png in the run folder, or in the current directory for a checkpoint outside one (the bundled weights, a loose .safetensors file).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress bar on stderr (there is none either when stderr is not a terminal).")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the results as JSON.")] = False,
):
    """Evaluate a trained model: top-1 and top-5 error, loss, per-class accuracy, a confusion-matrix PNG, and the paper's error for that model and data set where it has one. Writes only the PNG (see --out).

    Example: [bold]allconv eval runs/all-cnn-c-cifar10-20261123-101500 --tta flip[/bold]
    """
    with user_errors():
        from allconv_cli.charts import confusion_matrix
        from allconv_cli.evaluation import evaluate_checkpoint
        from allconv_cli.export import output_folder

        progress, stop = _progress_bar("evaluating", quiet)
        try:
            result = evaluate_checkpoint(checkpoint, dataset, data_dir, split, tta, batch_size, device, limit,
                                         precision=precision, progress=progress)
        finally:
            stop()
        png = out or output_folder(checkpoint) / f"confusion-{result['dataset']}-{split}.png"
        confusion_matrix(result["confusion"], result["classes"], png,
                         title=f"{result['model']} on {result['dataset']} {split}: "
                               f"{result['top1_error']:.2f} % top-1 error")
        result["confusion_png"] = str(png)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich import box
    from rich.table import Table

    console = _console(False)
    table = Table(title=f"{result['model']} (epoch {result['epoch']}) on {result['dataset']} {split}, "
                  f"{result['count']:,} images{f' with {tta} TTA' if tta != 'none' else ''}, {result['precision']}",
                  box=box.SIMPLE_HEAD)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("top-1 error %", f"{result['top1_error']:.2f}")
    table.add_row("top-5 error %", f"{result['top5_error']:.2f}")
    table.add_row("loss", f"{result['loss']:.4f}")
    if result["paper_error"] is not None:
        table.add_row("paper's error %", f"{result['paper_error']:.2f}")
        table.add_row("ours - paper", f"{result['top1_error'] - result['paper_error']:+.2f}")
    console.print(table)
    per_class = Table(title="per-class accuracy %", box=box.SIMPLE_HEAD)
    per_class.add_column("class")
    per_class.add_column("accuracy %", justify="right")
    for name, accuracy in zip(result["classes"], result["per_class_accuracy"]):
        per_class.add_row(name, f"{accuracy:.1f}")
    if len(result["classes"]) <= 20:
        console.print(per_class)
    console.print(f"confusion matrix: {png}")


@app.command()
def ablate(
    family: Annotated[Optional[str], typer.Option(help="a, b or c: the four models of that block of Table 3.", show_default=False)] = None,
    models: Annotated[Optional[str], typer.Option("--models", help="Comma-separated names or globs, e.g. 'all-cnn-*,model-c'.", show_default=False)] = None,
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
    jobs: Annotated[Optional[int], typer.Option(help="Runs in parallel. Default: one per GPU when there are several, else 1.", show_default=False)] = None,
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
        from allconv_cli import config as configuration

        names = ablation.select_models(family, models.split(",") if models else None)
        grid = _parse_numbers(lr_grid, "--lr-grid", float, ablation.PAPER_GRID) if lr_grid else None
        seed_list = _parse_numbers(seeds, "--seeds", int)
        seed_list = list(range(seed_list[0])) if len(seed_list) == 1 else seed_list
        if grid is not None and len(grid) > 1 and val_fraction is None:
            val_fraction = 0.1
        base = configuration.resolve(preset, epochs=epochs, dataset=dataset, data_dir=data_dir,
                                     batch_size=batch_size, train_limit=train_limit, test_limit=test_limit,
                                     device=device, precision=precision, val_fraction=val_fraction)
        grid = grid or [base.lr]
        errors = _console(True)
        show = not quiet and errors.is_terminal
        if dry_run:
            sizes = ablation.split_sizes(base)
            runs = ablation.planned_runs(names, grid, seed_list)
            total = ablation.cost(base, names, grid, seed_list, sizes["train"])
            with errors.status("timing one training step of each model", transient=True) if show \
                    else contextlib.nullcontext():
                estimate = ablation.estimate_seconds(base, names, grid, seed_list, sizes)
            if as_json:
                typer.echo(json.dumps({**total, "images": sizes, "estimate": estimate, "plan": runs}, indent=2))
                return
            for i, run in enumerate(runs, 1):
                typer.echo(f"{i:3d}. {run['model']}  lr {run['lr']}  seed {run['seed']}  "
                           f"{base.epochs} epochs x {sizes['train']:,} images")
            typer.echo(f"{total['runs']} runs, {total['epochs']:,} epochs, "
                       f"{total['training_images']:,} training images in all -> {out}")
            speeds = ", ".join(f"{m} {e['images_per_s']:,.0f} img/s" for m, e in estimate["per_model"].items())
            typer.echo(f"estimated time: {_duration(estimate['seconds'])} on {estimate['device_name']} "
                       f"({estimate['device']}, {estimate['precision']}; measured {speeds}: {estimate['measured']})")
            return

        def progress(event, run, result=None):
            if not show:
                return
            label = f"{run.model} lr {run.lr:g} seed {run.seed}"
            if event == "run":
                errors.print(f"training {label} ...")
            else:
                verb = "kept" if event == "skip" else "done"
                errors.print(f"{verb} {label}: test error {result['test_error']:.2f} %"
                             + (f", val error {result['val_error']:.2f} %" if result["val_error"] is not None else ""))

        try:
            rows = ablation.ablate(base, names, grid, seed_list, out, jobs or 1, progress)
        except KeyboardInterrupt:
            typer.echo(f"interrupted; run the same command again to continue {out}", err=True)
            raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = _console(False)
    table = (out / "table.md").read_text()
    if console.is_terminal:
        from rich.markdown import Markdown

        console.print(Markdown(table))
    else:  # the Markdown source itself reads well in a file and pastes into a README
        typer.echo(table, nl=False)
    console.print(f"tables and chart: {out}/table.md, table.csv, table.json, chart.png")


def _parse_numbers(text: str, option: str, kind, paper=None):
    """'1,2,3' -> [1, 2, 3] of ``kind``; 'paper' -> ``paper`` where the option has such a list."""
    if paper is not None and text.strip().lower() == "paper":
        return list(paper)
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None


PRECISION_HELP = ("Autocast of the forward and backward passes: fp32, bf16, fp16 (CUDA only) or auto (bf16 where "
                  "the device computes it natively). A map is the gradient of one neuron, and bf16's 8-bit "
                  "mantissa changes it, so keep fp32 unless speed matters more than the exact map.")


def _refuse_existing(paths, force: bool):
    """An output that exists is replaced only with --force: one line naming it otherwise."""
    for path in paths:
        if path is not None and path.exists() and not force:
            raise FileExistsError(f"{path} already exists: pass --force to overwrite it, or choose another --out")


def _scan_progress(total: int):
    """A rich progress bar on stderr for a data-set scan -> (callback(images scanned), stop);
    none when stderr is not a terminal."""
    console = _console(True)
    if not console.is_terminal:
        return None, lambda: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task("scan", total=total)
    bar.start()
    return lambda seen: bar.update(task, completed=seen), bar.stop


@app.command()
def visualize(
    images: Annotated[Optional[list[Path]], typer.Argument(show_default=False, help="Image files, any format PIL reads; each is scaled to cover the model's input size, then center-cropped, with the interpolation and crop_pct of the model's registered configuration (bilinear and 1.0 for allconv's nets).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", show_default=False, help="Run folder or .safetensors weights. Default: the bundled All-CNN-C trained on CIFAR-10.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", show_default=False, help="A timm or torchvision net (e.g. resnet18) whose plain safetensors state dict is --checkpoint; preprocessed with its own mean, std, input size and resizing.")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", show_default=False, help="Layer of the neuron (conv1..convN for allconv nets); with --class, the layer Grad-CAM weighs. Default: the last conv layer.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", show_default=False, help="Comma-separated: backprop, deconvnet, guided, gradcam, guided-gradcam. Default: the paper's backprop,deconvnet,guided; with --dataset, guided.")] = None,
    channel: Annotated[Optional[list[int]], typer.Option("--channel", show_default=False, help="A channel of --layer at its spatial maximum; repeat for more rows. With --dataset: the filters to scan (default: the first 8).")] = None,
    neuron: Annotated[Optional[tuple[int, int, int]], typer.Option("--neuron", show_default=False, help="One exact neuron: CHANNEL Y X.")] = None,
    top_channels: Annotated[Optional[int], typer.Option("--top-channels", show_default=False, help="The K most active channels of --layer per image, one row each.")] = None,
    target_class: Annotated[Optional[str], typer.Option("--class", show_default=False, help="Start at a class logit instead: a name, an index, or 'predicted'. Needed by gradcam and guided-gradcam.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", show_default=False, help="Instead of images: scan this data set (sample, cifar10, cifar100, imagefolder) for each filter's top patches, the paper's Fig. 3.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", show_default=False, help="Folder of the --dataset.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the --dataset to scan.")] = "test",
    top: Annotated[int, typer.Option("--top", help="Patches per filter with --dataset.")] = 10,
    out: Annotated[Path, typer.Option("--out", "-o", help="The grid PNG.")] = Path("grid.png"),
    raw: Annotated[Optional[Path], typer.Option("--raw", show_default=False, help="Also save the raw maps, the preprocessed input and the targets here (.safetensors).")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Overwrite an existing --out or --raw file (otherwise refused).")] = False,
    norm: Annotated[str, typer.Option("--norm", help="Map display: signed (around grey), abs (absolute value) or percentile (clipped at --percentile, then signed).")] = "signed",
    percentile: Annotated[float, typer.Option("--percentile", help="Clipping percentile of |map| for --norm percentile.")] = 99.5,
    upscale: Annotated[str, typer.Option("--upscale", help="Upscaling of small cells for viewing: nearest or bicubic.")] = "nearest",
    precision: Annotated[str, typer.Option("--precision", help=PRECISION_HELP)] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the targets, their activations and the written paths as JSON.")] = False,
):
    """Show what a neuron responds to, by the paper's backward rules at every ReLU (backprop,
    deconvnet, guided backprop) and Grad-CAM: one row per image or neuron, one column per
    method, written as a PNG grid. By default the neuron of the last conv layer with the
    largest activation on each image (the paper's Fig. 4); with --dataset, each filter's top
    patches beside their reconstructions (Fig. 3).

    Examples: [bold]allconv visualize image.jpg --layer conv6[/bold] ·
    [bold]allconv visualize cat.png --class cat --methods guided,gradcam,guided-gradcam[/bold] ·
    [bold]allconv visualize --dataset cifar10 --layer conv6 --top 10[/bold] ·
    [bold]allconv visualize dog.jpg --model resnet18 --checkpoint resnet18.safetensors --layer layer4[/bold]
    """
    with user_errors():
        if bool(images) == (dataset is not None):
            raise ValueError("give IMAGE files or --dataset NAME (one of the two)")
        for path, suffix, option in ((out, ".png", "--out"), (raw, ".safetensors", "--raw")):
            if path is not None and path.suffix.lower() != suffix:
                raise ValueError(f"{option} {path} must end in {suffix}")
        if dataset is not None and (neuron or top_channels or target_class):
            raise ValueError("with --dataset, choose the filters with --channel (not --neuron, "
                             "--top-channels or --class)")
        _refuse_existing((out, raw), force)
        from allconv_cli import grid, saliency
        from allconv_cli.checkpoint import atomic_write
        from allconv_cli.device import resolve_device, resolve_precision
        from allconv_cli.loading import load_for_saliency
        from allconv_cli.targets import class_label, default_layer

        grid.check_display(norm, percentile, upscale)
        method_list = methods.split(",") if methods else None
        dev = resolve_device(device)
        precision = resolve_precision(precision, dev)
        loaded = load_for_saliency(checkpoint, model, dev)
        if dataset is None:
            result = saliency.explain(loaded, images, layer, method_list or saliency.PAPER_METHODS,
                                      neuron=neuron, channels=channel or None, top_channels=top_channels,
                                      target_class=target_class, precision=precision)
            png = grid.saliency_figure(result, norm, percentile, upscale)
            rows = [{"path": result.paths[t.image], "image": t.image, "layer": t.layer, "channel": t.channel,
                     "y": t.y, "x": t.x, "value": t.value,
                     "class": class_label(loaded.classes, t.channel) if t.layer is None else None}
                    for t in result.targets]
            lines = [f"{Path(r['path']).name}: " + (f"{r['class']}, logit {r['value']:.4g}" if r["layer"] is None
                     else f"{r['layer']} channel {r['channel']} at ({r['y']}, {r['x']}), activation {r['value']:.4g}")
                     for r in rows]
        else:
            from allconv_cli import scan
            from allconv_cli.datasets import Batches, load_split

            layer = layer or default_layer(loaded.model)
            data = load_split(dataset, split, data_dir, loaded.input_size, fit=(loaded.interpolation, loaded.crop_pct))
            progress, stop = _scan_progress(len(data))
            try:
                result = scan.top_patches(loaded.model, loaded.preprocess,
                                          Batches(data, 256, shuffle=False, device=dev).epoch(0), layer,
                                          channel or None, top, method_list or ["guided"], progress)
            finally:
                stop()
            png = grid.patches_figure(result, loaded, f"{dataset} {split}", norm, percentile, upscale)
            rows = [{"layer": layer, "channel": c, "value": v, "scanned": result.scanned}
                    for c, v in zip(result.channels, result.values[:, 0].tolist())]
            lines = [f"{layer} filter {r['channel']}: top activation {r['value']:.4g}" for r in rows]
        if raw is not None:
            result.save(raw)
        atomic_write(out, lambda tmp: tmp.write_bytes(png))
    if as_json:
        typer.echo(json.dumps({"model": loaded.name, "weights": loaded.source, "precision": precision,
                               "targets" if dataset is None else "filters": rows, "out": str(out),
                               "raw": None if raw is None else str(raw)}, indent=2))
        return
    for line in lines:
        typer.echo(line)
    typer.echo(f"wrote {out}" + (f" and {raw}" if raw is not None else ""))


@app.command()
def sanity(
    images: Annotated[list[Path], typer.Argument(show_default=False, help="Image files, fitted to the model's input as visualize fits them.")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", show_default=False, help="Run folder or allconv .safetensors weights. Default: the bundled All-CNN-C trained on CIFAR-10.")] = None,
    against: Annotated[Optional[Path], typer.Option("--against", show_default=False, help="Instead of randomizing layers: compare with the maps of this run folder or checkpoint, e.g. a model trained with 'allconv train --shuffle-labels' (the data-randomization test).")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", show_default=False, help="Without --class: explain the trained model's most active neuron of this layer (paper's methods only) and randomize from it down. With --class: the layer Grad-CAM weighs. Default: the class, predicted by the trained model, and the last conv layer.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", show_default=False, help="Comma-separated: backprop, deconvnet, guided, gradcam, guided-gradcam. Default: all five for a class, the paper's three for a neuron.")] = None,
    target_class: Annotated[Optional[str], typer.Option("--class", show_default=False, help="The class logit to explain: a name, an index or 'predicted' (the trained model's prediction, the default without --layer).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="cascade (re-initialize from the top layer down, one more layer per stage) or independent (one layer at a time).")] = "cascade",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the re-initialization (the model's own initializer).")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for one grid PNG per method and the similarity chart.")] = Path("sanity"),
    force: Annotated[bool, typer.Option("--force", metavar="", help="Overwrite PNGs that --out already holds (otherwise refused).")] = False,
    norm: Annotated[str, typer.Option("--norm", help="Map display in the grids: abs (what SSIM compares), signed or percentile.")] = "abs",
    precision: Annotated[str, typer.Option("--precision", help=PRECISION_HELP)] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the similarity table, per-image scores, targets and written paths as JSON.")] = False,
):
    """Sanity checks for saliency maps (Adebayo et al., 2018): re-initialize the model's weights
    layer by layer with its own initializer and see how much each method's map changes. Similarity
    to the trained model's map, per stage: Spearman rank correlation of |map| and of the signed
    map, and SSIM. A map that barely changes when the weights are random does not explain the
    model. Writes a grid per method (rows: images; columns: trained, then each stage) and a chart.

    Examples: [bold]allconv sanity docs/chelsea.png docs/coffee.jpg[/bold] ·
    [bold]allconv sanity cat.png --mode independent --methods guided,backprop[/bold] ·
    [bold]allconv sanity cat.png --against runs/shuffled-labels[/bold]
    """
    with user_errors():
        from allconv_cli.saliency import METHODS, PAPER_METHODS, check_methods

        if against is not None and mode != "cascade":
            raise ValueError("--against compares two models; it takes no --mode")
        by_class = target_class is not None or layer is None
        method_list = check_methods(methods.split(",")) if methods else (METHODS if by_class else PAPER_METHODS)
        pngs = [out / f"{m}.png" for m in method_list] + [out / "similarity.png"]
        _refuse_existing(pngs, force)
        from allconv_cli import grid
        from allconv_cli.checkpoint import atomic_write
        from allconv_cli.device import resolve_device
        from allconv_cli.loading import load_for_saliency
        from allconv_cli.sanity import sanity_check

        grid.check_display(norm, 99.5, "nearest")
        dev = resolve_device(device)
        loaded = load_for_saliency(checkpoint, None, dev)
        other = load_for_saliency(against, None, dev) if against is not None else None
        result = sanity_check(loaded, images, layer, method_list, mode=mode, target_class=target_class,
                              against=other, seed=seed, precision=precision)
        for method, png in zip(method_list, pngs):
            figure = grid.sanity_figure(result, method, loaded, norm)
            atomic_write(png, lambda tmp, figure=figure: tmp.write_bytes(figure))
        what = f"against {against}" if against is not None else f"{mode} randomization, seed {seed}"
        chart = grid.sanity_chart(result, f"{loaded.name} ({loaded.source}), {what}: mean over "
                                          f"{len(result.targets)} images, {result.selection}")
        atomic_write(pngs[-1], lambda tmp: tmp.write_bytes(chart))
    rows = result.table()
    if as_json:
        typer.echo(json.dumps({
            "model": loaded.name, "weights": loaded.source, "against": None if other is None else other.source,
            "mode": result.mode, "seed": seed, "precision": result.precision, "layer": result.layer,
            "selection": result.selection,
            "targets": [{"path": result.paths[t.image], "layer": t.layer, "channel": t.channel, "y": t.y, "x": t.x,
                         "value": t.value} for t in result.targets],
            "stages": [{"name": n, "randomized": r} for n, r in zip(result.stage_names, result.randomized_layers)],
            "table": rows,
            "per_image": {m: {k: [[None if v != v else v for v in stage] for stage in values.tolist()]
                              for k, values in metrics.items()} for m, metrics in result.scores.items()},
            "pngs": [str(p) for p in pngs]}, indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"similarity to the trained model's map, mean over {len(result.targets)} images "
                  f"({what}; {result.selection})", box=box.SIMPLE_HEAD)
    for column in ("method", "stage", "Spearman |map|", "Spearman signed", "SSIM"):
        table.add_column(column, justify="left" if column in ("method", "stage") else "right")
    count = len(result.targets)
    for row in rows:
        table.add_row(row["method"], row["stage"], *(
            "n/a" if row[k] is None else f"{row[k]:.3f}" + ("" if row[f"{k}_images"] == count else
                                                           f" ({row[f'{k}_images']}/{count})")
            for k in ("spearman_abs", "spearman_signed", "ssim")))
    console = _console(False)
    console.print(table)
    if any(row[f"{k}_images"] < count for row in rows for k in ("spearman_abs", "spearman_signed")):
        console.print("(k/n): the mean of the k images whose map is not constant; a constant map, e.g. all "
                      "zero because every ReLU above it is closed, has no rank correlation.")
    console.print(f"wrote {', '.join(str(p) for p in pngs)}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run folder or an allconv .safetensors checkpoint.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx (one file), pt2 (torch.export) or safetensors (a timm folder).", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16: the weights' type, and the input's for onnx and pt2.")] = "fp32",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output. Default: model.onnx, model.pt2 or export-safetensors/ in the run folder, or in the current directory for a checkpoint outside one (the bundled weights, a loose .safetensors file, whose name the file takes).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Overwrite an existing export at --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON.")] = False,
):
    """Export a trained model to ONNX, torch.export's .pt2 or a timm safetensors folder, then run the export on random inputs at batch sizes 1 and 3 against the PyTorch model; a file that differs by more than the tolerance is not kept. Writes only the export (see --out), after checking that the disk has room for it.

    Examples: [bold]allconv export runs/all-cnn-c-cifar10-20261123-101500 --format onnx[/bold] · [bold]allconv export runs/all-cnn-c-cifar10-20261123-101500 --format safetensors --dtype fp16[/bold]
    """
    with user_errors():
        from allconv_cli.export import export as export_model

        result = export_model(run, fmt, dtype, out, force)
    for warning in result.warnings:
        typer.echo(f"Warning: {warning}", err=True)
    if as_json:
        import dataclasses

        typer.echo(json.dumps(dataclasses.asdict(result), indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"{result.format} export, verified", box=box.SIMPLE, show_header=False)
    table.add_row("path", result.path)
    table.add_row("size", f"{result.size / 1e6:.1f} MB")
    table.add_row("dtype", result.dtype)
    table.add_row("max |diff|", f"{result.max_abs_diff:.2g} at batch sizes {', '.join(map(str, result.batch_sizes))}")
    table.add_row("tolerance", f"{result.tolerance:.2g} ({result.relative_tolerance:g} x largest |output| "
                  f"{result.output_scale:.3g})")
    table.add_row("verified with", result.verified_with)
    _console(False).print(table)


@app.command()
def benchmark(
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name (see 'allconv models').")] = "all-cnn-c",
    mode: Annotated[str, typer.Option(help="train (the trainer's own step with its data path), infer (the network alone), data (batches, augmentation, standardization) or all.")] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step.")] = 128,
    steps: Annotated[Optional[int], typer.Option(help="Timed steps. Default: 20 on the CPU, 200 on CUDA.", show_default=False)] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Untimed steps before them. Default: 5 on the CPU, 50 on CUDA.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast where the CPU or GPU computes bf16 natively, else fp32), fp32, bf16 or fp16 (CUDA only).")] = "auto",
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last", metavar="", help="channels_last memory format.")] = True,
    compile: Annotated[bool, typer.Option("--compile", metavar="", help="torch.compile the network; compiling happens in the warm-up.")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the results as JSON.")] = False,
):
    """Measure speed on synthetic data (random uint8 images of the model's input size, so it runs offline): images/s and step time of the trainer's own training step, of inference and of the data path alone, with GFLOP per image (convolutions, counted from the layer shapes), achieved TFLOP/s, its share of a large matmul's rate measured in the same process and precision, the share of the GPU's peak where it is known, and peak memory.

    Examples: [bold]allconv benchmark --model all-cnn-c --mode train[/bold] ·
    [bold]allconv benchmark --precision fp32[/bold] ·
    [bold]allconv benchmark --device cuda --batch-size 512 --json[/bold]
    """
    with user_errors():
        from allconv_cli.benchmark import run as run_benchmark

        result = run_benchmark(model, mode, batch_size, steps, warmup, device, precision, channels_last, compile)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['device_name']} ({result['device']}, "
                  f"{result['threads']} threads, {result['kernels']}): {result['precision']}, "
                  f"{'channels_last' if result['channels_last'] else 'NCHW'}{', compiled' if compile else ''}, "
                  f"batch {result['batch_size']}, {result['steps']} timed steps after {result['warmup']} warm-up; "
                  f"matmul {result['matmul_tflops']:.3f} TFLOP/s", box=box.SIMPLE_HEAD)
    for column in ("mode", "images/s", "step ms", "GFLOP/image", "TFLOP/s", "% of matmul", "% of peak", "peak memory"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for name, row in result["results"].items():
        counted = row["gflop_per_image"] is not None
        share = "unknown" if row["peak_share"] is None else f"{100 * row['peak_share']:.1f}"
        memory = (f"{row['peak_cuda_mb']:,.0f} MiB CUDA" if row["peak_cuda_mb"] is not None
                  else f"{row['peak_rss_mb']:,.0f} MiB RSS")
        table.add_row(name, f"{row['images_per_s']:,.0f}", f"{row['step_ms']:.2f}",
                      f"{row['gflop_per_image']:.4f}" if counted else "-",
                      f"{row['tflop_per_s']:.3f}" if counted else "-",
                      f"{100 * row['matmul_share']:.1f}" if counted else "-", share if counted else "-", memory)
    console = _console(False)
    console.print(table)
    console.print("GFLOP: convolutions only, 2 x multiply-adds, counted from the layer shapes; a training "
                  "step is forward + backward. % of matmul: against a 4096x4096 (CPU) or 8192x8192 (CUDA) "
                  "matmul in the same precision, measured just before. Data: synthetic uint8 images held in "
                  "memory on the device.")


def run():
    """Console-script entry point."""
    app(prog_name="allconv")


if __name__ == "__main__":
    sys.exit(run())
