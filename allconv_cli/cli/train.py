"""allconv train: one run from the defaults, a preset and the options, with progress bars."""

from __future__ import annotations

import json
import os
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
    batch_norm: Annotated[Optional[bool], typer.Option("--batch-norm/--no-batch-norm", metavar="", help="Deviation: BatchNorm after every conv. Default: the model's own, off for the paper's networks (a variant such as all-cnn-c-bn sets its own; 'allconv models NAME' shows it).", show_default=False)] = None,
    class_relu: Annotated[Optional[bool], typer.Option("--class-relu/--no-class-relu", metavar="", help="The paper's ReLU after the class conv. Default: the model's own, on.", show_default=False)] = None,
    drop_input: Annotated[Optional[float], typer.Option("--drop-input", help="Dropout on the input; 0 turns it off. Default: the model's own, 0.2 as in the paper (0 for all-cnn-imagenet and all-cnn-c-bn).", show_default=False)] = None,
    drop_rate: Annotated[Optional[float], typer.Option("--drop-rate", help="Dropout after each pool or the conv replacing it. Default: the model's own, 0.5 as in the paper (0.25 for all-cnn-c-bn).", show_default=False)] = None,
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
        from allconv_cli import train as trainer
        from allconv_cli.train import settings as configuration

        settings = {k: v for k, v in ctx.params.items() if k in configuration.FIELDS and k != "preset"}
        if milestones is not None:
            settings["milestones"] = parse_numbers(milestones, "--milestones", int)
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
        console = make_console(as_json)
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
                      f"({duration(reached['wall_seconds'])})")
    if summary["paper_error"] is not None:
        table.add_row("paper's error %", f"{summary['paper_error']:.2f}")
    console.print(table)
    state = "finished" if summary["finished"] else f"stopped; continue with: allconv train --resume {summary['run_dir']}"
    console.print(f"run folder: {summary['run_dir']} ({state})")
