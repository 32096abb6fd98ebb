"""The ``allconv`` command: a table of contents over the library.

Each command reads its options, calls one library function and prints. Heavy imports (torch,
timm) happen inside command bodies so that ``allconv --help`` and completion stay fast.
Library errors (ValueError, OSError) become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import sys
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


def run():
    """Console-script entry point."""
    app(prog_name="allconv")


if __name__ == "__main__":
    sys.exit(run())
