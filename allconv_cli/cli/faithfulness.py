"""allconv faithfulness: which saliency map points at what the model uses (deletion, insertion, ROAD)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import (
    duration,
    make_console,
    progress_bar,
    refuse_existing,
    user_errors,
)

_COLUMNS = {"deletion": "deletion AUC ↓", "insertion": "insertion AUC ↑", "road_morf": "ROAD MoRF ↓",
            "road_lerf": "ROAD LeRF ↑"}


def faithfulness(
    images: Annotated[Optional[list[Path]], typer.Argument(show_default=False, help="Image files to score instead of a data split, fitted to the model's input as visualize fits them.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", show_default=False, help="Run folder or .safetensors weights. Default: the bundled All-CNN-C trained on CIFAR-10.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", show_default=False, help="A timm or torchvision net (e.g. resnet18) whose plain safetensors state dict is --checkpoint; preprocessed with its own mean, std, input size and resizing.")] = None,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Data set to score when no IMAGES are given: sample (bundled), cifar10, cifar100 or imagefolder.")] = "sample",
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", show_default=False, help="Folder of the --dataset.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the --dataset.")] = "test",
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", show_default=False, help="Score at most this many images of the split (a seeded random subset), for quick runs.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", show_default=False, help="Comma-separated: backprop, deconvnet, guided, gradcam, guided-gradcam, and the model-free maps random and sobel (the image's edges). Default: all seven.")] = None,
    target_class: Annotated[str, typer.Option("--class", help="The class whose probability is measured and whose logit the maps explain: a name, an index, or 'predicted' (each image's own).")] = "predicted",
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", show_default=False, help="The layer Grad-CAM weighs. Default: the last conv layer.")] = None,
    baseline: Annotated[str, typer.Option("--baseline", help="What removed pixels become in deletion, and the image insertion starts from: blur (the input blurred by a Gaussian of sigma = width / 16, 2 px at 32 x 32) or zero (0 in the model's input, the training data's mean colour for standardized input).")] = "blur",
    steps: Annotated[int, typer.Option("--steps", help="Deletion and insertion steps: the curves are measured at 0, 1/steps, ..., 1 of the pixels.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random map, the order of tied pixels, ROAD's imputation noise, the --limit subset and the bootstrap intervals.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch (each is perturbed and scored 2 + 36 times per method).")] = 250,
    precision: Annotated[str, typer.Option("--precision", help="Autocast of the forward passes that score perturbed images: auto (bf16 where the CPU or GPU computes it natively), fp32, bf16 or fp16 (CUDA only). Maps are always computed in fp32.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="The chart of the mean curves (PNG).")] = Path("faithfulness.png"),
    force: Annotated[bool, typer.Option("--force", metavar="", help="Overwrite an existing --out (otherwise refused).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress bar on stderr (there is none either when stderr is not a terminal).")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the table, the mean curves and every image's scores as JSON.")] = False,
):
    """Which map is faithful? Remove each image's pixels in the order of a map, most relevant
    first, and watch the probability of the explained class: deletion and insertion AUC
    (Petsiuk et al., 2018) and ROAD, most and least relevant first, with noisy linear imputation
    (Rong et al., 2022), for the paper's three methods, Grad-CAM, guided Grad-CAM and two maps
    that know nothing of the model (random, Sobel edges). Prints each metric's mean and 95 %
    bootstrap interval over images and writes the mean curves as a PNG chart.

    Examples: [bold]allconv faithfulness[/bold] (the bundled model on the sample's 1,000 test images) ·
    [bold]allconv faithfulness --limit 100 --methods guided,gradcam,sobel[/bold] ·
    [bold]allconv faithfulness cat.png dog.png --baseline zero --json[/bold]
    """
    with user_errors():
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {out} must end in .png")
        if images and (limit is not None or data_dir is not None):
            raise ValueError("--limit and --data-dir choose images of a data split: drop them, or drop the IMAGES")
        refuse_existing([out], force)
        from allconv_cli.device import resolve_device
        from allconv_cli.explain import faithfulness as faith
        from allconv_cli.files.loading import load_checkpoint
        from allconv_cli.util import atomic_write

        method_list = faith.check_methods(methods.split(",") if methods else None)
        faith.check_baseline(baseline)
        dev = resolve_device(device)
        loaded = load_checkpoint(checkpoint, model, dev)
        progress, stop = progress_bar("scoring maps", quiet)
        try:
            result = faith.faithfulness(loaded, images, dataset=dataset, split=split, data_dir=data_dir, count=limit,
                                        methods=method_list, target_class=target_class, cam_layer=layer,
                                        baseline=baseline, steps=steps, seed=seed, precision=precision,
                                        batch_size=batch_size, progress=progress)
        finally:
            stop()
        title = (f"{loaded.name} ({loaded.source}) on {result.source}; {result.selection}; {baseline} baseline, "
                 f"seed {seed}, {result.precision}")
        chart = faith.faithfulness_chart(result, title)
        atomic_write(out, lambda tmp: tmp.write_bytes(chart))
    rows = result.table()
    if as_json:
        typer.echo(json.dumps(_report(rows, result, loaded, out, faith.ROAD_FRACTIONS), indent=2))
        return
    _print_table(rows, result, out)


def _report(rows: list[dict], result, loaded, out: Path, road_fractions) -> dict:
    """What --json prints: the table, the mean curves and every image's scores."""
    scores = result.scores()
    return {
        "model": loaded.name, "weights": loaded.source, "images": result.source, "selection": result.selection,
        "baseline": result.baseline, "steps": result.steps, "seed": result.seed, "precision": result.precision,
        "cam_layer": result.cam_layer, "seconds": round(result.seconds, 2), "table": rows,
        "fractions": {"deletion": result.fractions, "insertion": result.fractions,
                      "road_morf": list(road_fractions), "road_lerf": list(road_fractions)},
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
