"""The ``allconv`` command: a table of contents over the library.

Each command (one module each) reads its options, calls one library function and prints. Heavy
imports (torch, timm) happen inside command bodies so that ``allconv --help`` and completion
stay fast. Library errors (ValueError, OSError) become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

from typing import Annotated

import typer

from allconv_cli import __version__
from allconv_cli.cli import (
    ablate,
    benchmark,
    evaluate,
    explain,
    export,
    faithfulness,
    models,
    train,
)

app = typer.Typer(
    name="allconv",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


for command in (models.models, train.train):
    app.command()(command)
app.command("eval")(evaluate.evaluate)
for command in (ablate.ablate, explain.visualize, explain.sanity, faithfulness.faithfulness, export.export,
                benchmark.benchmark):
    app.command()(command)


def run():
    """Console-script entry point."""
    app(prog_name="allconv")
