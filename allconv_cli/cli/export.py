"""allconv export: ONNX, torch.export or a timm folder, verified against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import AsJson, Force, make_console, out_option, user_errors


def export(
    run: Annotated[Path, typer.Argument(help="A run folder or an allconv .safetensors checkpoint.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx (one file), pt2 (torch.export) or safetensors (a timm folder).", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16: the weights' type, and the input's for onnx and pt2.")] = "fp32",
    out: Annotated[Optional[Path], out_option("Output. Default: model.onnx, model.pt2 or export-safetensors/ in the run folder, or in the current directory for a checkpoint outside one (the bundled weights, a loose .safetensors file, whose name the file takes).")] = None,
    force: Force = False,
    as_json: AsJson = False,
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
    make_console(False).print(table)
