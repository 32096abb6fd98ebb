"""The optimizers a run can choose (``--optimizer``): one entry each, carrying everything that
choice needs. A new optimizer is one entry here (and its builder's code): its name, help,
settings, rules, the option's help and choices, the checks and the tests follow from the entry.

Torch-free, so that ``allconv --help`` reads it: the builder is named as ``module:function`` and
imported when a run builds its optimizer.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from allconv_cli.train.fields import ABOVE_0, OPTIMIZER, UNIT, setting


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer.

    ``build``: "module:function" (or the function) that takes (param_groups, config, device) ->
    a torch optimizer; the parameter groups are ``train.optim.make_optimizer``'s. ``help``: what it
    steps with (the help of --optimizer). ``own_weight_rule``: the conv weights step by a rule of
    their own, so they come as the first group of their own. ``settings``: the settings only it
    reads, declared as every setting is (``fields.setting``): each becomes a field of TrainConfig
    and an option, its help prefixed with "With --optimizer NAME". ``needs_batch_norm``: why it
    needs a BatchNorm after every conv (None: it does not); a run without one is refused."""

    build: str | Callable
    help: str
    own_weight_rule: bool = False
    settings: dict = field(default_factory=dict)
    needs_batch_norm: str | None = None

    def builder(self) -> Callable:
        if callable(self.build):
            return self.build
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module), function)

    def __str__(self) -> str:  # the option's help lists each choice with this text
        return self.help


OPTIMIZERS: dict[str, OptimizerInfo] = {
    "sgd": OptimizerInfo(
        "allconv_cli.train.optim:sgd",
        "SGD on every parameter (the paper's)"),
    "muon": OptimizerInfo(
        "allconv_cli.train.optim:muon",
        "Muon for the conv weights, SGD for the rest; needs --batch-norm",
        own_weight_rule=True,
        needs_batch_norm="it rescales every conv's weights, which only a BatchNorm after the conv makes harmless",
        settings={
            # the share of each conv's weight norm that one step moves (the schedule applies); 0.05
            # was the best of 0.03, 0.05 and 0.07 for All-CNN-C in ten CIFAR-10 epochs
            "muon_lr": (float, setting(0.05, "the conv weights' peak learning rate.", check=ABOVE_0)),
            "muon_momentum": (float, setting(0.6, "the conv weights' Nesterov momentum.", check=UNIT)),
        }),
}


def optimizer_settings() -> list[tuple[str, type, object]]:
    """(name, type, field) of every optimizer's own settings, their help prefixed with its name."""
    fields = []
    for name, info in OPTIMIZERS.items():
        for key, (kind, declared) in info.settings.items():
            metadata = {**declared.metadata, "help": f"With --optimizer {name}: {declared.metadata['help']}",
                        "panel": OPTIMIZER}
            fields.append((key, kind, dataclasses.field(default=declared.default, metadata=metadata)))
    return fields
