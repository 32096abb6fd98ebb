"""The training settings as command-line options, generated once from their declarations
(``train.config.TrainConfig``) for every command that takes them: ``train``, ``ablate`` and
``benchmark``. A command marked ``@takes_settings(...)`` gets one ``--option`` per setting (help,
panel, choices and default from the declaration; the details are in docs/training.md), each
defaulting to None, "not given", and receives the given ones in its ``**settings``."""

from __future__ import annotations

import inspect
import typing
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import parse_numbers
from allconv_cli.train.config import FIELDS, list_presets, shown_default
from allconv_cli.train.config import kind as config_kind
from allconv_cli.train.fields import PANELS

FIRST = ("model", "dataset", "data_dir", "preset")  # the options a user reaches for first, first in their panels
OTHER = "Other settings"  # the panel of a setting that declares none (tests/test_settings.py refuses one)


def setting_option(name: str) -> inspect.Parameter:
    """The option of one training setting, from its declaration alone: names, type, panel, help with
    the choices and the default (its range is in the error a value outside it gets). Every option
    defaults to None, "not given"."""
    meta, kind = FIELDS[name].metadata, config_kind(name)
    dashed = name.replace("_", "-")
    flags = meta["flags"] or ((f"--{dashed}/--no-{dashed}",) if kind is bool else (f"--{dashed}",))
    words = [meta["help"]]
    if meta["choice_help"]:
        words.append("; ".join(f"{choice}: {text}" for choice, text in meta["choice_help"].items()) + ".")
    elif meta["choices"]:
        words.append(f"One of: {', '.join(meta['choices'])}.")
    if name == "preset":
        words.append(f"Bundled: {', '.join(list_presets())}.")
    words.append(f"Default: {shown_default(name)}.")
    metavar = {"metavar": ""} if kind is bool else {}
    option = typer.Option(*flags, help=" ".join(words), show_default=False,
                          rich_help_panel=meta["panel"] or OTHER, **metavar)
    value_type = str if typing.get_origin(kind) is list else kind  # a list is typed as comma-separated numbers
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[value_type], option])


def takes_settings(*, leave_out: tuple[str, ...] = ()):
    """Decorate a command whose ``**settings`` receive one option per training setting (but those
    in ``leave_out``, which the command varies or names itself): Typer reads the options from the
    command's signature, which this extends; the command's own parameters come after them."""
    unknown = set(leave_out) - set(FIELDS)
    if unknown:
        raise ValueError(f"not training settings: {', '.join(sorted(unknown))}")

    def decorate(command):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = [n for n in (*FIRST, *(n for n in FIELDS if n not in FIRST)) if n not in leave_out]
        names.sort(key=lambda n: (*PANELS, None).index(FIELDS[n].metadata["panel"]))  # stable: FIRST first
        parameters = [setting_option(n) for n in names] + own
        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate


def given_settings(settings: dict) -> dict:
    """The settings a user gave (None is "not given"), lists parsed from their comma-separated text."""
    given = {k: v for k, v in settings.items() if v is not None}
    for key, value in given.items():
        if typing.get_origin(config_kind(key)) is list:
            given[key] = parse_numbers(value, f"--{key.replace('_', '-')}", int)
    return given
