"""allconv models: the registry as a table, or one network's layers."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import AsJson, make_console, user_errors


def models(
    name: Annotated[Optional[str], typer.Argument(help="Show one model's layers (e.g. all-cnn-c) instead of the registry table.", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", "-k", help="Classes K for the counts. Default: the model's own, 10 or 1000.", show_default=False)] = None,
    as_json: AsJson = False,
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
    table = _registry_table(rows) if name is None else _layer_table(rows[0])
    console = make_console(False)
    console.print(table)
    if name is None:
        console.print("err %: the paper's test error on CIFAR-10 without augmentation (ImageNet top-1 "
                      "for all-cnn-imagenet), blank where the paper has no such network; --json lists every figure "
                      "the paper reports.")
        for weights in pretrained_names():
            console.print(f"pretrained: {weights}, the bundled weights (All-CNN-C with BatchNorm): "
                          f"timm.create_model({weights.split('.')[0]!r}, pretrained=True)")


def _registry_table(rows: list[dict]):
    """Every registered network: exact parameters beside the paper's, its error, input and layers."""
    from rich import box
    from rich.table import Table

    table = Table(title="Exact parameters (weights + biases) beside the paper's",
                  box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    for column in ("params", "paper", "err %"):
        table.add_column(column, justify="right", no_wrap=True, min_width=9)
    table.add_column("input", no_wrap=True)
    table.add_column("layers", no_wrap=True)
    for row in rows:
        errors = list(row["paper_error"].values())  # blanks where the paper has no figure
        table.add_row(row["name"], f"{row['params']:,}", row["paper_params"] or "",
                      f"{errors[0]:.2f}" if errors else "",
                      "x".join(map(str, row["input_size"])),
                      f"{row['layer_names'][0]}..{row['layer_names'][-1]}")
    return table


def _layer_table(row: dict):
    """One network's layers with their output shapes and parameters."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=f"{row['name']}: {row['params']:,} parameters, "
                  f"input {'x'.join(map(str, row['input_size']))}")
    for column in ("layer", "type", "output (C, H, W)", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for layer in row["layers"]:
        table.add_row(layer["name"], layer["type"], "x".join(map(str, layer["output"])),
                      f"{layer['params']:,}" if layer["params"] else "")
    return table
