"""allconv eval: a trained model's errors on a split, with a confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import AsJson, Device, Quiet, Threads, make_console, out_option, progress_bar, user_errors
from allconv_cli.util import plural


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A run folder or an allconv .safetensors checkpoint.", show_default=False)],
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Data set. Default: the one it was trained on.", show_default=False)] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder of the data set. Default: the training run's.", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="test or train.")] = "test",
    tta: Annotated[str, typer.Option("--tta", help="Test-time augmentation: none, flip (average the predictions of each image and its mirror) or flip-shift (also both moved by one pixel down-right and up-left, weighted half).")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")] = 256,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate at most this many images (a fixed subset).", show_default=False)] = None,
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast where the CPU or GPU computes bf16 natively, else fp32), fp32, bf16 or fp16 (CUDA only).")] = "auto",
    out: Annotated[Optional[Path], out_option("The confusion-matrix PNG. Default: confusion-DATASET-SPLIT.png in the run folder, or in the current directory for a checkpoint outside one (the bundled weights, a loose .safetensors file).")] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
    threads: Threads = None,
):
    """Evaluate a trained model: top-1 and top-5 error, loss, per-class accuracy, a confusion-matrix PNG, and the paper's error for that model and data set where it has one. Writes only the PNG (see --out).

    Example: [bold]allconv eval runs/all-cnn-c-cifar10-20261123-101500 --tta flip[/bold]
    """
    with user_errors():
        from allconv_cli.charts import confusion_matrix
        from allconv_cli.cpu_threads import use_threads
        from allconv_cli.evaluate import evaluate_checkpoint
        from allconv_cli.export import output_folder

        choice = use_threads(threads)
        progress, stop = progress_bar("evaluating", quiet)
        try:
            result = evaluate_checkpoint(checkpoint, dataset, data_dir, split, tta, batch_size, device, limit,
                                         precision=precision, progress=progress)
        finally:
            stop()
        png = out or output_folder(checkpoint) / f"confusion-{result['dataset']}-{split}.png"
        confusion_matrix(result["confusion"], result["classes"], png,
                         title=f"{result['network']} on {result['dataset']} {split}: "
                               f"{result['top1_error']:.2f} % top-1 error")
        result["confusion_png"] = str(png)
        result["cpu_threads"] = choice.record()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print_evaluation(result, split, tta, png)


def _print_evaluation(result: dict, split: str, tta: str, png: Path):
    """The errors beside the paper's, and the per-class accuracy for up to 20 classes."""
    from rich import box
    from rich.table import Table

    console = make_console(False)
    table = Table(title=f"{result['network']} (epoch {result['epoch']}) on {result['dataset']} {split}, "
                  f"{plural(result['count'], 'image')}{f' with {tta} TTA' if tta != 'none' else ''}, "
                  f"{result['precision']}",
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
