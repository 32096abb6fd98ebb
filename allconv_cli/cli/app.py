"""The ``allconv`` command: a table of contents over the library.

Each command (one module each) reads its options, calls one library function and prints. Heavy
imports (torch, timm) happen inside command bodies so that ``allconv --help`` and completion
stay fast. Library errors (ValueError, OSError) become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

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



class _FlagsShowNoValue:
    """Typer shows a type, ``<bool>``, after flags that take no value, its own --help and
    --install-completion among them; ours set ``metavar=""``, and this does the same for Typer's."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Group(_FlagsShowNoValue, TyperGroup):
    pass


class _Command(_FlagsShowNoValue, TyperCommand):
    pass


app = typer.Typer(
    name="allconv",
    cls=_Group,
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


# in the README's order: what there is, train, evaluate, export, then ablate and explain
for name, command in (("models", models.models), ("train", train.train), ("eval", evaluate.evaluate),
                      ("export", export.export), ("ablate", ablate.ablate), ("visualize", explain.visualize),
                      ("sanity", explain.sanity), ("faithfulness", faithfulness.faithfulness),
                      ("benchmark", benchmark.benchmark)):
    app.command(name, cls=_Command)(command)


def run():
    """Console-script entry point."""
    app(prog_name="allconv")
