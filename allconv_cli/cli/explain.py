"""allconv visualize and allconv sanity: saliency grids, and whether the maps depend on the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import (
    AsJson,
    Device,
    Force,
    PRECISION_HELP,
    Threads,
    make_console,
    out_option,
    progress_bar,
    refuse_existing,
    user_errors,
)
from allconv_cli.cli.method_options import with_method_settings
from allconv_cli.data.sources import DATA_SOURCES
from allconv_cli.explain.methods import CLASS_METHODS, METHODS, PAPER_METHODS, fitting
from allconv_cli.util import plural


@with_method_settings
def visualize(
    images: Annotated[Optional[list[Path]], typer.Argument(show_default=False, help="Image files, any format PIL reads; each is scaled to cover the model's input size, then center-cropped, with the interpolation and crop_pct of the model's registered configuration (bilinear and 1.0 for allconv's nets).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", show_default=False, help="Run folder or .safetensors weights. Default: the bundled All-CNN-C trained on CIFAR-10.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", show_default=False, help="A timm or torchvision net (e.g. resnet18) whose plain safetensors state dict is --checkpoint; preprocessed with its own mean, std, input size and resizing.")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", show_default=False, help="Layer of the neuron (conv1..convN for allconv nets); with --class, the layer Grad-CAM weighs. Default: the last conv layer.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", show_default=False, help=f"Comma-separated: {', '.join(METHODS)}. Default: the paper's {','.join(PAPER_METHODS)}; with --dataset, guided.")] = None,
    channel: Annotated[Optional[list[int]], typer.Option("--channel", show_default=False, help="A channel of --layer at its spatial maximum; repeat for more rows. With --dataset: the filters to scan (default: the first 8).")] = None,
    neuron: Annotated[Optional[tuple[int, int, int]], typer.Option("--neuron", show_default=False, help="One exact neuron: CHANNEL Y X.")] = None,
    top_channels: Annotated[Optional[int], typer.Option("--top-channels", show_default=False, help="The K most active channels of --layer per image, one row each.")] = None,
    target_class: Annotated[Optional[str], typer.Option("--class", show_default=False, help=f"Start at a class logit instead: a name, an index, or 'predicted'. Needed by {' and '.join(CLASS_METHODS)}.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", show_default=False, help=f"Instead of images: scan this data set ({', '.join(DATA_SOURCES)}) for each filter's top patches, the paper's Fig. 3.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", show_default=False, help="Folder of the --dataset.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the --dataset to scan.")] = "test",
    top: Annotated[int, typer.Option("--top", help="Patches per filter with --dataset: 1 to the images of the split.")] = 10,
    out: Annotated[Optional[Path], out_option("The grid PNG. Default: IMAGE-LAYER.png (the first image's name; DATASET-SPLIT-LAYER.png with --dataset) in the current directory.")] = None,
    raw: Annotated[Optional[Path], typer.Option("--raw", show_default=False, help="Also save the raw maps, the preprocessed input and the targets here (.safetensors).")] = None,
    force: Force = False,
    norm: Annotated[str, typer.Option("--norm", help="Map display: signed (around grey), abs (absolute value) or percentile (clipped at --percentile, then signed).")] = "signed",
    percentile: Annotated[float, typer.Option("--percentile", help="Clipping percentile of |map| for --norm percentile.")] = 99.5,
    upscale: Annotated[str, typer.Option("--upscale", help="Upscaling of small cells for viewing: nearest or bicubic.")] = "nearest",
    precision: Annotated[str, typer.Option("--precision", help=PRECISION_HELP)] = "fp32",
    device: Device = "auto",
    as_json: AsJson = False,
    method_settings: dict | None = None,
):
    """Show what a neuron responds to, by the paper's backward rules at every ReLU (backprop, deconvnet, guided backprop) and, beside them, Grad-CAM, input x gradient, integrated gradients, SmoothGrad, occlusion and LRP: one row per image or neuron, one column per method, written as a PNG grid. By default the neuron of the last conv layer with the largest activation on each image (the paper's Fig. 4); with --dataset, each filter's top patches beside their reconstructions (Fig. 3).

    Examples: [bold]allconv visualize image.jpg --layer conv6[/bold] ·
    [bold]allconv visualize cat.png --class cat --methods guided,gradcam,guided-gradcam[/bold] ·
    [bold]allconv visualize --dataset cifar10 --layer conv6 --top 10[/bold] ·
    [bold]allconv visualize dog.jpg --model resnet18 --checkpoint resnet18.safetensors --layer layer4[/bold]
    """
    with user_errors():
        _check_visualize_options(images, dataset, out, raw, neuron or top_channels or target_class)
        from allconv_cli.device import resolve_device, resolve_precision
        from allconv_cli.explain import figures, saliency, scan
        from allconv_cli.files.loading import load_checkpoint
        from allconv_cli.util import atomic_write

        figures.check_display(norm, percentile, upscale)
        method_list = methods.split(",") if methods else None
        dev = resolve_device(device)
        precision = resolve_precision(precision, dev)
        loaded = load_checkpoint(checkpoint, model, dev)
        if dataset is None:
            result = saliency.explain(loaded, images, layer, method_list or PAPER_METHODS,
                                      neuron=neuron, channels=channel or None, top_channels=top_channels,
                                      target_class=target_class, precision=precision, settings=method_settings)
            png = figures.saliency_figure(result, norm, percentile, upscale)
        else:
            progress, stop = progress_bar("scanning", quiet=False)
            try:
                result = scan.scan_dataset(loaded, dataset, split, data_dir, layer, channel or None, top,
                                           method_list or ["guided"], dev, progress, method_settings)
            finally:
                stop()
            png = figures.patches_figure(result, loaded, f"{dataset} {split}", norm, percentile, upscale)
        out = out or _default_grid(images, dataset, split, result.layer, target_class is not None)
        refuse_existing((out, raw), force)  # only now: an error about an input comes first
        if raw is not None:
            result.save(raw)
        atomic_write(out, lambda tmp: tmp.write_bytes(png))
    rows = result.rows()
    if as_json:
        typer.echo(json.dumps({"model": loaded.name, "weights": loaded.source, "precision": precision,
                               "settings": result.settings if dataset is None else None,
                               "targets" if dataset is None else "filters": rows, "out": str(out),
                               "raw": None if raw is None else str(raw)}, indent=2))
        return
    for row in rows:
        typer.echo(_describe(row))
    typer.echo(f"wrote {out}" + (f" and {raw}" if raw is not None else ""))


def _check_visualize_options(images, dataset, out: Path, raw: Path | None, picks_neurons: bool):
    """The options that contradict each other, or name outputs of the wrong kind, before any work."""
    if bool(images) == (dataset is not None):
        raise ValueError("give IMAGE files or --dataset NAME (one of the two)")
    for path, suffix, option in ((out, ".png", "--out"), (raw, ".safetensors", "--raw")):
        if path is not None and path.suffix.lower() != suffix:
            raise ValueError(f"{option} {path} must end in {suffix}")
    if dataset is not None and picks_neurons:
        raise ValueError("with --dataset, choose the filters with --channel (not --neuron, "
                         "--top-channels or --class)")


def _default_grid(images: list[Path] | None, dataset: str | None, split: str, layer: str, by_class: bool) -> Path:
    """The grid's name when --out is not given: its first image's (or the scanned split's) and the
    layer's (and -class for class targets), so that maps of other images or layers never meet an
    existing file: chelsea-conv6.png, chelsea-and-2-more-conv9-class.png, cifar10-test-conv6.png."""
    if dataset is not None:
        return Path(f"{dataset}-{split}-{layer}.png")
    more = f"-and-{len(images) - 1}-more" if len(images) > 1 else ""
    return Path(f"{images[0].stem}{more}-{layer}{'-class' if by_class else ''}.png")


def _describe(row: dict) -> str:
    """One printed line per target (an image's neuron or class) or per scanned filter."""
    if "scanned" in row:
        return f"{row['layer']} filter {row['channel']}: top activation {row['value']:.4g}"
    measured = "".join(f"; {method}: " + ", ".join(f"{what.replace('_', ' ')} {value:.3g}"
                                                   for what, value in values.items())
                       for method, values in row["reports"].items())
    if row["layer"] is None:
        return f"{Path(row['path']).name}: {row['class']}, logit {row['value']:.4g}{measured}"
    return (f"{Path(row['path']).name}: {row['layer']} channel {row['channel']} at ({row['y']}, {row['x']}), "
            f"activation {row['value']:.4g}{measured}")


@with_method_settings
def sanity(
    images: Annotated[list[Path], typer.Argument(show_default=False, help="Image files, fitted to the model's input as visualize fits them.")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", show_default=False, help="Run folder or allconv .safetensors weights. Default: the bundled All-CNN-C trained on CIFAR-10.")] = None,
    against: Annotated[Optional[Path], typer.Option("--against", show_default=False, help="Instead of randomizing layers: compare with the maps of this run folder or checkpoint, e.g. a model trained with 'allconv train --shuffle-labels' (the data-randomization test).")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", show_default=False, help="Without --class: explain the trained model's most active neuron of this layer (paper's methods only) and randomize from it down. With --class: the layer Grad-CAM weighs. Default: the class, predicted by the trained model, and the last conv layer.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", show_default=False, help=f"Comma-separated: {', '.join(METHODS)}. Default: all of them for a class, {','.join(fitting(by_class=False))} for a neuron.")] = None,
    target_class: Annotated[Optional[str], typer.Option("--class", show_default=False, help="The class logit to explain: a name, an index or 'predicted' (the trained model's prediction, the default without --layer).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="cascade (re-initialize from the top layer down, one more layer per stage) or independent (one layer at a time).")] = "cascade",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the re-initialization (the model's own initializer).")] = 0,
    out: Annotated[Path, out_option("Folder for one grid PNG per method and the similarity chart.", default_shown=True)] = Path("sanity"),
    force: Force = False,
    norm: Annotated[str, typer.Option("--norm", help="Map display in the grids: abs (what SSIM compares), signed or percentile.")] = "abs",
    precision: Annotated[str, typer.Option("--precision", help=PRECISION_HELP)] = "fp32",
    device: Device = "auto",
    as_json: AsJson = False,
    threads: Threads = None,
    method_settings: dict | None = None,
):
    """Sanity checks for saliency maps (Adebayo et al., 2018): re-initialize the model's weights layer by layer with its own initializer and see how much each method's map changes. Similarity to the trained model's map, per stage: Spearman rank correlation of |map| and of the signed map, and SSIM. A map that barely changes when the weights are random does not explain the model. Writes a grid per method (rows: images; columns: trained, then each stage) and a chart.

    Examples: [bold]allconv sanity docs/chelsea.png docs/coffee.jpg[/bold] ·
    [bold]allconv sanity cat.png --mode independent --methods guided,backprop[/bold] ·
    [bold]allconv sanity cat.png --against runs/shuffled-labels[/bold]
    """
    with user_errors():
        from allconv_cli.cpu_threads import use_threads
        from allconv_cli.device import resolve_device
        from allconv_cli.explain import figures
        from allconv_cli.explain.methods import check_methods
        from allconv_cli.explain.sanity import sanity_check
        from allconv_cli.files.loading import load_checkpoint
        from allconv_cli.util import atomic_write

        if against is not None and mode != "cascade":
            raise ValueError("--against compares two models; it takes no --mode")
        by_class = target_class is not None or layer is None
        method_list = check_methods(methods.split(",") if methods else fitting(by_class))
        figures.check_display(norm, 99.5, "nearest")
        dev = resolve_device(device)
        use_threads(threads)
        loaded = load_checkpoint(checkpoint, None, dev)
        other = load_checkpoint(against, None, dev) if against is not None else None
        result = sanity_check(loaded, images, layer, method_list, mode=mode, target_class=target_class,
                              against=other, seed=seed, precision=precision, settings=method_settings)
        pngs = [out / f"{m}.png" for m in method_list] + [out / "similarity.png"]
        refuse_existing(pngs, force)  # only now: an error about an input comes first
        for method, png in zip(method_list, pngs):
            figure = figures.sanity_figure(result, method, loaded, norm)
            atomic_write(png, lambda tmp, figure=figure: tmp.write_bytes(figure))
        what = f"against {against}" if against is not None else f"{mode} randomization, seed {seed}"
        chart = figures.sanity_chart(result, f"{loaded.name} ({loaded.source}), {what}: mean over "
                                          f"{plural(len(result.targets), 'image')}, {result.selection}")
        atomic_write(pngs[-1], lambda tmp: tmp.write_bytes(chart))
    if as_json:
        typer.echo(json.dumps({"model": loaded.name, "weights": loaded.source,
                               "against": None if other is None else other.source, **result.to_json(),
                               "pngs": [str(p) for p in pngs]}, indent=2))
        return
    _print_similarity(result, what, pngs)


def _print_similarity(result, what: str, pngs: list[Path]):
    """The sanity check's table: each method's mean similarity to the trained map, per stage."""
    from rich import box
    from rich.table import Table

    rows, count = result.table(), len(result.targets)
    table = Table(title=f"similarity to the trained model's map, mean over {plural(count, 'image')} "
                  f"({what}; {result.selection})", box=box.SIMPLE_HEAD)
    for column in ("method", "stage", "Spearman |map|", "Spearman signed", "SSIM"):
        table.add_column(column, justify="left" if column in ("method", "stage") else "right")
    for row in rows:
        table.add_row(row["method"], row["stage"], *(
            "n/a" if row[k] is None else f"{row[k]:.3f}" + ("" if row[f"{k}_images"] == count else
                                                           f" ({row[f'{k}_images']}/{count})")
            for k in ("spearman_abs", "spearman_signed", "ssim")))
    console = make_console(False)
    console.print(table)
    if any(row[f"{k}_images"] < count for row in rows for k in ("spearman_abs", "spearman_signed")):
        console.print("(k/n): the mean of the k images whose map is not constant; a constant map, e.g. all "
                      "zero because every ReLU above it is closed, has no rank correlation.")
    console.print(f"wrote {', '.join(str(p) for p in pngs)}")
