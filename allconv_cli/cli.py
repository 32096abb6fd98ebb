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
from typing import Optional

import typer

from allconv_cli import __version__

app = typer.Typer(
    name="allconv",
    help="The All Convolutional Net (Springenberg et al., 2015): train, evaluate, ablate, "
    "export and visualize the paper's networks.",
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
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _version(value: bool):
    if value:
        typer.echo(f"allconv {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    """The All Convolutional Net (Springenberg et al., 2015): train, evaluate, ablate, export
    and visualize the paper's networks.

    Example: [bold]allconv models[/bold]
    """


@app.command()
def models(
    name: Optional[str] = typer.Argument(
        None, help="Show one model's layers (e.g. all-cnn-c) instead of the registry table."
    ),
    num_classes: Optional[int] = typer.Option(
        None, "--num-classes", "-k", help="Classes K for the counts (default: the model's own, 10 or 1000)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the registry: exact parameter counts beside the paper's, the paper's error, input
    size and layer names; or, given a NAME, that model's layers with their output shapes.

    Examples: [bold]allconv models[/bold] · [bold]allconv models all-cnn-c --num-classes 100[/bold]
    """
    with user_errors():
        from allconv_cli.models import describe

        rows = describe(name, num_classes=num_classes)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich import box
    from rich.console import Console
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
    console = Console()
    console.print(table)
    if name is None:
        console.print("err %: the paper's test error on CIFAR-10 without augmentation (ImageNet top-1 "
                      "for all-cnn-imagenet); --json lists every figure the paper reports.")


EXIT_FAILED = 1  # a run that diverged
EXIT_SIGNAL = {2: 130, 15: 143}  # SIGINT, SIGTERM: the shell's 128 + signal number


def _console(to_stderr: bool):
    from rich.console import Console

    return Console(stderr=to_stderr)


class _TrainProgress:
    """Rich progress bars for the trainer's progress events: epochs, and batches of the epoch."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
        self.epochs = self.batches = None

    def __call__(self, event, **fields):
        if event == "start":
            config = fields["config"]
            self.console.print(f"[bold]{config.model}[/bold] on {config.dataset}: {fields['examples']:,} "
                               f"training images, {fields['steps']} steps an epoch, {fields['device']}"
                               f"{' x ' + str(fields['world']) if fields['world'] > 1 else ''} -> {fields['run_dir']}")
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
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registry name, e.g. all-cnn-c (see 'allconv models')."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="sample (bundled, default), cifar10, cifar100 or imagefolder."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder of the data set (CIFAR: torchvision's layout, downloaded there if missing; imagefolder: train/ and val/ or test/)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="paper-cifar10, paper-cifar10-aug, paper-cifar100, paper-imagenet, fast-cifar10, cpu-cifar10, smoke, or a .toml path; options override its keys."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 30)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Global batch size (default 128), split over DDP processes."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 0.05)."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum (default 0.9)."),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum (default off)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay (default 0.001, the paper's)."),
    schedule: Optional[str] = typer.Option(None, help="paper (x0.1 at --milestones), cosine (default), onecycle or constant."),
    milestones: Optional[str] = typer.Option(None, help="Comma-separated epochs for the paper schedule (default 200,250,300)."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear warm-up, in epochs (default 1)."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Train on random crops of this side (px) in the first --crop-epochs epochs: cheaper steps, e.g. 24 of 32 px costs half (default 0: off)."),
    crop_epochs: Optional[int] = typer.Option(None, "--crop-epochs", help="How many of the first epochs train on --crop windows; the rest train at full size (default 0)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from these weights (a run folder or allconv .safetensors) and their preprocessing, with a fresh optimizer and schedule: fine-tuning, or a further cycle."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Label smoothing (default 0)."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="Per-step weight EMA decay, e.g. 0.999 (default 0: off)."),
    augment: Optional[str] = typer.Option(None, help="none, paper (flips + translations <= 5 px; default) or strong (+ CutMix/Mixup)."),
    preprocess: Optional[str] = typer.Option(None, help="standardize (per-channel mean/std; default) or zca (the paper's GCN + ZCA)."),
    batch_norm: Optional[bool] = typer.Option(None, "--batch-norm/--no-batch-norm", help="Deviation: BatchNorm after every conv (default off)."),
    class_relu: Optional[bool] = typer.Option(None, "--class-relu/--no-class-relu", help="The paper's ReLU after the class conv (default on)."),
    drop_input: Optional[float] = typer.Option(None, "--drop-input", help="Dropout on the input (default: the model's, 0.2 as in the paper; 0 turns it off)."),
    drop_rate: Optional[float] = typer.Option(None, "--drop-rate", help="Dropout after each pool or the conv replacing it (default: the model's, 0.5 as in the paper)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Hold out this share of train for evaluation; test is then scored once at the end."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use at most this many training images."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="Use at most this many test images."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialization, order, augmentation and dropout (default 0)."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic", help="Deterministic kernels (slower on CUDA)."),
    device: Optional[str] = typer.Option(None, help="auto (default), cpu, cuda or cuda:N."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on CUDA (default on)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format (default on)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the training step (default off)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers for large image folders (default 4)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N epochs (default 1)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/MODEL-DATASET-TIME)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder exactly where it stopped."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop (resumably) after this many epochs of this call."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout (progress goes to stderr)."),
):
    """Train a model of the paper: the paper's protocol (presets paper-*), a fast modern
    recipe (fast-cifar10) or your own settings. Writes a run folder with safetensors weights,
    the resolved settings, per-epoch metrics, learning curves and a resumable state. Ctrl-C
    stops after the current step with a resumable checkpoint (exit 130; SIGTERM 143).

    Examples: [bold]allconv train --model all-cnn-c --dataset cifar100[/bold] ·
    [bold]allconv train --preset paper-cifar10 --data-dir data[/bold] ·
    [bold]allconv train --resume runs/all-cnn-c-cifar10-20261123-101500[/bold] ·
    [bold]torchrun --nproc-per-node 2 --no-python allconv train --preset fast-cifar10[/bold]
    """
    options = {k: v for k, v in locals().items()
               if k not in ("preset", "out", "resume", "stop_after", "as_json")}
    with user_errors():
        from allconv_cli import config as configuration
        from allconv_cli import train as trainer

        if milestones is not None:
            options["milestones"] = _parse_numbers(milestones, "--milestones", int)
        if resume is not None:
            extra = [k for k, v in options.items() if v is not None and k not in trainer.RESUME_MAY_CHANGE]
            if preset or out or extra:
                raise ValueError("--resume continues with the run's saved settings; drop "
                                 f"{', '.join('--' + k.replace('_', '-') for k in extra) or '--preset/--out'}")
            config = configuration.from_json(trainer.load_run_config(resume).to_json())
            for key in trainer.RESUME_MAY_CHANGE:
                if options[key] is not None:
                    setattr(config, key, options[key])
            run_dir = resume
        else:
            config = configuration.resolve(preset, **options)
            run_dir = out or Path("runs") / trainer.run_name(config)
        console = _console(as_json)
        progress = _TrainProgress(console)
        try:
            summary = trainer.train(config, run_dir, progress=progress, resume=resume is not None,
                                    stop_after=stop_after)
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
    if "test" in summary:
        table.add_row("test top-1 error % (final)", f"{summary['test']['top1_error']:.2f}")
    if summary["paper_error"] is not None:
        table.add_row("paper's error %", f"{summary['paper_error']:.2f}")
    console.print(table)
    state = "finished" if summary["finished"] else f"stopped; continue with: allconv train --resume {summary['run_dir']}"
    console.print(f"run folder: {summary['run_dir']} ({state})")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A run folder or an allconv .safetensors checkpoint."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Data set (default: the one it was trained on)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder of the data set (default: the training run's)."),
    split: str = typer.Option("test", help="test (default) or train."),
    tta: bool = typer.Option(False, "--tta", help="Average the predictions of each image and its mirror."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per batch."),
    limit: Optional[int] = typer.Option(None, help="Evaluate at most this many images (a fixed subset)."),
    device: str = typer.Option("auto", help="auto (default), cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Confusion-matrix PNG (default: beside the checkpoint)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Evaluate a trained model: top-1 and top-5 error, loss, per-class accuracy, a
    confusion-matrix PNG, and the paper's error for that model and data set where it has one.

    Example: [bold]allconv eval runs/all-cnn-c-cifar10-20261123-101500 --tta[/bold]
    """
    with user_errors():
        from allconv_cli.charts import confusion_matrix
        from allconv_cli.train import evaluate_checkpoint

        result = evaluate_checkpoint(checkpoint, dataset, data_dir, split, tta, batch_size, device, limit)
        folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
        png = out or folder / f"confusion-{result['dataset']}-{split}.png"
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
                  f"{result['count']:,} images{' with TTA' if tta else ''}", box=box.SIMPLE_HEAD)
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
    family: Optional[str] = typer.Option(None, help="a, b or c: the four models of that block of Table 3."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated names or globs, e.g. 'all-cnn-*,model-c'."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="The protocol every model is trained with (see 'allconv train --help')."),
    lr_grid: Optional[str] = typer.Option(None, "--lr-grid", help="'paper' for {0.25, 0.1, 0.05, 0.01}, or comma-separated rates; picked on --val-fraction."),
    seeds: str = typer.Option("1", help="How many seeds (3) or which (0,1,2)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of train held out to pick the rate (default 0.1 with a grid)."),
    epochs: Optional[int] = typer.Option(None, help="Override the preset's epochs."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Override the preset's data set."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder of the data set."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Override the preset's batch size."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use at most this many training images."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="Use at most this many test images."),
    device: Optional[str] = typer.Option(None, help="auto (default), cpu, cuda or cuda:N."),
    jobs: Optional[int] = typer.Option(None, help="Runs in parallel (default: one per GPU when there are several, else 1)."),
    out: Path = typer.Option(Path("runs/ablation"), "--out", "-o", help="Ablation folder; the same command continues it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and what they cost, then stop."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
):
    """Reproduce the paper's ablation (Table 3): train each model under one protocol, optionally
    over the paper's learning-rate grid (picked on a validation split, never the test set) and
    several seeds, and write the table (Markdown, CSV, JSON) and a bar chart beside the paper's.
    Interrupted? Run the same command again: finished runs are kept, others resume.

    Examples: [bold]allconv ablate --family c --preset paper-cifar10 --lr-grid paper --seeds 3[/bold] ·
    [bold]allconv ablate --models all-cnn-c,model-c --preset smoke --seeds 2 --out runs/try[/bold]
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
                                     device=device, val_fraction=val_fraction)
        grid = grid or [base.lr]
        if dry_run:
            from allconv_cli.datasets import load_split
            from allconv_cli.models import create_model

            size = tuple(create_model(names[0]).pretrained_cfg["input_size"])
            count = len(load_split(base.dataset, "train", base.data_dir, size))
            count = min(count, base.train_limit or count)
            count -= round(count * base.val_fraction)
            runs = ablation.planned_runs(names, grid, seed_list)
            total = ablation.cost(base, names, grid, seed_list, count)
            if as_json:
                typer.echo(json.dumps({**total, "plan": runs}, indent=2))
                return
            for i, run in enumerate(runs, 1):
                typer.echo(f"{i:3d}. {run['model']}  lr {run['lr']}  seed {run['seed']}  "
                           f"{base.epochs} epochs x {count:,} images")
            typer.echo(f"{total['runs']} runs, {total['epochs']:,} epochs, "
                       f"{total['training_images']:,} training images in all -> {out}")
            return
        console = _console(as_json)

        def progress(event, run, result=None):
            label = f"{run.model} lr {run.lr:g} seed {run.seed}"
            if event == "run":
                console.print(f"training {label} ...")
            else:
                verb = "kept" if event == "skip" else "done"
                console.print(f"{verb} {label}: test error {result['test_error']:.2f} %"
                              + (f", val error {result['val_error']:.2f} %" if result["val_error"] is not None else ""))

        try:
            rows = ablation.ablate(base, names, grid, seed_list, out, jobs or 1, progress)
        except KeyboardInterrupt:
            typer.echo(f"interrupted; run the same command again to continue {out}", err=True)
            raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.markdown import Markdown

    console.print(Markdown((out / "table.md").read_text()))
    console.print(f"tables and chart: {out}/table.md, table.csv, table.json, chart.png")


def _parse_numbers(text: str, option: str, kind, paper=None):
    """'1,2,3' -> [1, 2, 3] of ``kind``; 'paper' -> ``paper`` where the option has such a list."""
    if paper is not None and text.strip().lower() == "paper":
        return list(paper)
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None


@app.command()
def visualize(
    images: Optional[list[Path]] = typer.Argument(None, show_default=False, help="Image files, any format PIL reads; each is scaled (bicubic) to cover the model's input size, then center-cropped."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Run folder or .safetensors weights (default: the bundled All-CNN-C trained on CIFAR-10)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A timm or torchvision net (e.g. resnet18) whose plain safetensors state dict is --checkpoint; preprocessed with its own mean, std and input size."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer of the neuron (conv1..convN for allconv nets); with --class, the layer Grad-CAM weighs. Default: the last conv layer."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated: backprop, deconvnet, guided, gradcam, guided-gradcam (default: the paper's backprop,deconvnet,guided; with --dataset: guided)."),
    channel: Optional[list[int]] = typer.Option(None, "--channel", help="A channel of --layer at its spatial maximum; repeat for more rows. With --dataset: the filters to scan (default: the first 8)."),
    neuron: Optional[tuple[int, int, int]] = typer.Option(None, "--neuron", help="One exact neuron: CHANNEL Y X."),
    top_channels: Optional[int] = typer.Option(None, "--top-channels", help="The K most active channels of --layer per image, one row each."),
    target_class: Optional[str] = typer.Option(None, "--class", help="Start at a class logit instead: a name, an index, or 'predicted'. Needed by gradcam and guided-gradcam."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Instead of images: scan this data set (sample, cifar10, cifar100, imagefolder) for each filter's top patches, the paper's Fig. 3."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder of the --dataset."),
    split: str = typer.Option("test", "--split", help="Split of the --dataset to scan."),
    top: int = typer.Option(10, "--top", help="Patches per filter with --dataset."),
    out: Path = typer.Option(Path("grid.png"), "--out", "-o", help="The grid PNG."),
    raw: Optional[Path] = typer.Option(None, "--raw", help="Also save the raw maps, the preprocessed input and the targets here (.safetensors)."),
    norm: str = typer.Option("signed", "--norm", help="Map display: signed (around grey), abs (absolute value) or percentile (clipped at --percentile, then signed)."),
    percentile: float = typer.Option(99.5, "--percentile", help="Clipping percentile of |map| for --norm percentile."),
    upscale: str = typer.Option("nearest", "--upscale", help="Upscaling of small cells for viewing: nearest or bicubic."),
    device: str = typer.Option("auto", help="auto (default), cpu, cuda or cuda:N."),
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
        from allconv_cli import grid, saliency
        from allconv_cli.checkpoint import atomic_write
        from allconv_cli.device import resolve_device

        grid.check_display(norm, percentile, upscale)
        method_list = methods.split(",") if methods else None
        loaded = saliency.load_for_saliency(checkpoint, model, resolve_device(device))
        if dataset is None:
            result = saliency.explain(loaded, images, layer, method_list or saliency.PAPER_METHODS,
                                      neuron=neuron, channels=channel or None,
                                      top_channels=top_channels, target_class=target_class)
            png = grid.saliency_figure(result, norm, percentile, upscale)
            rows = [f"{Path(result.paths[t.image]).name}: "
                    + (f"{saliency.class_label(loaded.classes, t.channel)}, logit {t.value:.4g}" if t.layer is None
                       else f"{t.layer} channel {t.channel} at ({t.y}, {t.x}), activation {t.value:.4g}")
                    for t in result.targets]
        else:
            from allconv_cli.datasets import iter_batches

            layer = layer or saliency.default_layer(loaded.model)
            batches = iter_batches(dataset, data_dir, split, loaded.input_size, 256)
            result = saliency.top_patches(loaded.model, loaded.preprocess, batches, layer,
                                          channel or None, top, method_list or ["guided"])
            png = grid.patches_figure(result, loaded, f"{dataset} {split}", norm, percentile, upscale)
            rows = [f"{layer} filter {c}: top activation {v:.4g}"
                    for c, v in zip(result.channels, result.values[:, 0].tolist())]
        if raw is not None:
            result.save(raw)
        atomic_write(out, lambda tmp: tmp.write_bytes(png))
    for row in rows:
        typer.echo(row)
    typer.echo(f"wrote {out}" + (f" and {raw}" if raw is not None else ""))


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run folder or an allconv .safetensors checkpoint."),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx (one file), pt2 (torch.export) or safetensors (a timm folder)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16: the weights' type, and the input's for onnx and pt2."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output (default beside the checkpoint: RUN/model.onnx, RUN/model.pt2, RUN/export-safetensors/)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing export at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Export a trained model to ONNX, torch.export's .pt2 or a timm safetensors folder, then
    run the export on random inputs at batch sizes 1 and 3 against the PyTorch model; a file
    that differs by more than the tolerance is not kept.

    Examples: [bold]allconv export runs/all-cnn-c-cifar10-20261123-101500 --format onnx[/bold] ·
    [bold]allconv export runs/all-cnn-c-cifar10-20261123-101500 --format safetensors --dtype fp16[/bold]
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
    model: str = typer.Option("all-cnn-c", "--model", "-m", help="Registry name, e.g. all-cnn-c (see 'allconv models')."),
    mode: str = typer.Option("all", "--mode", help="train (allconv's training step with its data path), infer (the network alone), data (batches, augmentation, standardization) or all."),
    batch_size: int = typer.Option(128, "--batch-size", "-b", help="Images per step."),
    steps: Optional[int] = typer.Option(None, help="Timed steps (default 20 on the CPU, 200 on CUDA)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed steps before them (default 5 on the CPU, 50 on CUDA)."),
    device: str = typer.Option("auto", help="auto (default), cpu, cuda or cuda:N."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (default on; the CPU runs fp32)."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", help="channels_last memory format (default on)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network; compiling happens in the warm-up."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Measure speed on synthetic data (random uint8 images of the model's input size, so it
    runs offline): images/s and step time of allconv's training step, of inference and of the
    data path alone, with GFLOP per image (convolutions, counted from the layer shapes),
    achieved TFLOP/s, the share of the GPU's peak where it is known, and peak memory.

    Examples: [bold]allconv benchmark --model all-cnn-c --mode train[/bold] ·
    [bold]allconv benchmark --device cuda --batch-size 512 --json[/bold]
    """
    with user_errors():
        from allconv_cli.benchmark import run as run_benchmark

        result = run_benchmark(model, mode, batch_size, steps, warmup, device, amp, channels_last, compile)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['device_name']} ({result['device']}, "
                  f"{result['threads']} threads): {result['precision']}, "
                  f"{'channels_last' if result['channels_last'] else 'NCHW'}{', compiled' if compile else ''}, "
                  f"batch {result['batch_size']}, {result['steps']} timed steps after {result['warmup']} warm-up",
                  box=box.SIMPLE_HEAD)
    for column in ("mode", "images/s", "step ms", "GFLOP/image", "TFLOP/s", "% of peak", "peak memory"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for name, row in result["results"].items():
        counted = row["gflop_per_image"] is not None
        share = "unknown" if row["peak_share"] is None else f"{100 * row['peak_share']:.1f}"
        memory = (f"{row['peak_cuda_mb']:,.0f} MiB CUDA" if row["peak_cuda_mb"] is not None
                  else f"{row['peak_rss_mb']:,.0f} MiB RSS")
        table.add_row(name, f"{row['images_per_s']:,.0f}", f"{row['step_ms']:.2f}",
                      f"{row['gflop_per_image']:.4f}" if counted else "-",
                      f"{row['tflop_per_s']:.3f}" if counted else "-", share if counted else "-", memory)
    console = _console(False)
    console.print(table)
    console.print("GFLOP: convolutions only, 2 x multiply-adds, counted from the layer shapes; a training "
                  "step is forward + backward. Data: synthetic uint8 images held in memory on the device.")


def run():
    """Console-script entry point."""
    app(prog_name="allconv")


if __name__ == "__main__":
    sys.exit(run())
