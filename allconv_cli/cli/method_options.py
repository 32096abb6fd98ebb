"""The saliency methods' own settings as options of the commands that compute maps (visualize,
sanity, faithfulness): one option per ``Setting`` of every entry of ``methods.SALIENCY_METHODS``,
``--PREFIX-NAME`` (e.g. ``--ig-steps``), its help, default and range read from the entry each
time the command line is built, so that an entry added later gets its options too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Optional

import typer

from allconv_cli.explain.methods import setting_options

PANEL = "Method settings"


def _parameter(option: str, method: str, setting) -> inspect.Parameter:
    """The keyword parameter Typer reads as ``option``: not given (None) unless typed."""
    kind = str if setting.choices else type(setting.default)
    info = typer.Option(option, help=f"{method}: {setting.describe()}", show_default=False, rich_help_panel=PANEL,
                        metavar="|".join(setting.choices) if setting.choices else kind.__name__.upper())
    return inspect.Parameter(_keyword(option), inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], info])


def _keyword(option: str) -> str:
    return "method_" + option.lstrip("-").replace("-", "_")


class with_method_settings:  # lower case: it is used as a decorator
    """``command`` plus an option per method setting; the command gets them as ``method_settings``
    (method -> setting -> value, the options given only). An option that would clash with one of
    the command's own raises ValueError when the command line is built."""

    def __init__(self, command: Callable):
        self.command = command
        self.__name__, self.__qualname__ = command.__name__, command.__qualname__
        self.__module__, self.__doc__ = command.__module__, command.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(self.command, eval_str=True)
        kept = [p for p in own.parameters.values() if p.name != "method_settings"]
        flags = {flag for p in kept for flag in _flags(p)}
        added = []
        for option, (method, setting) in setting_options().items():
            if option in flags:
                raise ValueError(f"{method}'s setting {setting.name} would be {option}, which "
                                 f"{self.__name__} already has: give {method} a prefix")
            added.append(_parameter(option, method, setting))
        return own.replace(parameters=kept + added)

    @property
    def __annotations__(self) -> dict:
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **options):
        settings: dict[str, dict] = {}
        for option, (method, setting) in setting_options().items():
            value = options.pop(_keyword(option), None)
            if value is not None:
                settings.setdefault(method, {})[setting.name] = value
        return self.command(**options, method_settings=settings)


def _flags(parameter: inspect.Parameter) -> list[str]:
    """The option names a command's parameter declares (``typer.Option("--x", "-x")``), or, where
    it declares none, the one Typer makes of its name."""
    for info in getattr(parameter.annotation, "__metadata__", ()):
        declared = [getattr(info, "default", None), *(getattr(info, "param_decls", None) or ())]
        flags = [d for d in declared if isinstance(d, str) and d.startswith("-")]
        if flags:
            return flags
    return [f"--{parameter.name.replace('_', '-')}"]
