"""How a training setting is declared: ``setting(default, help, ...)``, a dataclass field that
carries what its option shows and the range it takes. A torch-free leaf, so that the settings
(``config``) and the tables that bring settings of their own (``optimizers``) declare them alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

Check = tuple[Callable[[object], bool], str]  # (test of a value, the words saying what passes)
UNIT: Check = (lambda v: 0 <= v < 1, "in [0, 1)")
AT_LEAST_1: Check = (lambda v: v >= 1, "of at least 1")
ABOVE_0: Check = (lambda v: v > 0, "above 0")
DROPOUT: Check = (lambda v: 0 <= v < 1, "in [0, 1) (0 turns that dropout off)")


# The panels of `allconv train --help`, in the order shown: each setting declares its own
DATA, NETWORK, OPTIMIZER, SCHEDULE, AUGMENTATION, RUN = (
    "Data", "Network", "Optimizer", "Schedule", "Augmentation", "Run and output")
PANELS = (DATA, NETWORK, OPTIMIZER, SCHEDULE, AUGMENTATION, RUN)

NOT_STATED = object()  # a setting the paper leaves open (batch size, initialization) or does not have


def setting(default, help: str, *, panel: str | None = None, choices=None, check: Check | None = None,
            flags: tuple[str, ...] = (), default_text: str | None = None, paper=NOT_STATED):
    """A field of TrainConfig with what its option shows: ``help`` (one short sentence; the default
    and the choices are added from the other arguments; details go to docs/training.md), ``panel``
    (one of ``PANELS``: where the option is listed; tests/test_settings.py checks that each has
    one), ``choices`` (names, or a dict name -> what it does),
    ``check`` (range), ``flags`` (the option's names, e.g. ("--model", "-m"); default: --name, and
    --name/--no-name for a bool), ``default_text`` (how to show a None default), ``paper`` (the
    paper's value, or a tuple of the values it allows: any other is a deviation that a run names)."""
    # a dict's keys stay a live view: a table that gains an entry (a test's) offers it at once
    metadata = {"help": help, "choices": choices.keys() if isinstance(choices, dict) else
                tuple(choices) if choices is not None else None,
                "choice_help": choices if isinstance(choices, dict) else None, "check": check, "flags": flags,
                "default_text": default_text, "paper": paper, "panel": panel}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
