"""What an ablation trains: its models, seeds, rates and --grid combinations, each run's settings,
and the check of every combination before the first run starts.

A combination is a full set of settings: the resolved settings, then one value of each --grid
setting. Every (model, combination) is checked as ``allconv train`` checks its settings (values,
the rules between them, a setting that would not take effect, the --init file, the batch that
--augment strong mixes, the device and precision on this machine, the data's folder), and a rate
grid needs a validation split in each; ``check_plan`` does all of it, for the run and the dry run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
from pathlib import Path

from allconv_cli.device import resolve_device, resolve_precision
from allconv_cli.files.weights import check_weights_file
from allconv_cli.ablate.slots import check_jobs, default_jobs
from allconv_cli.models.registry import NETWORKS, list_models, resolve_name
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.run import check_batch
from allconv_cli.train.settings import check_in_effect, check_values, parse_setting, validate

PAPER_GRID = (0.25, 0.1, 0.05, 0.01)  # Section 3.2
MAX_SEEDS = 1_000  # seeds of one ablation: each is a whole training run of every model
GRID = "--grid"  # where a combination's own values come from, in messages
PLAN_NAME = "ablation.json"  # an ablation folder's plan
# Table 3's blocks, as the registry's rows say: family -> its models, as typed (all-cnn-c)
FAMILIES = {family: [name.replace("_", "-") for name, row in NETWORKS.items() if row.family == family]
            for family in sorted({row.family for row in NETWORKS.values() if row.family})}

# ((setting, value), ...): one combination of --grid, in its order; a list value is held as a tuple,
# so that a combination can key the results
Variant = tuple[tuple[str, object], ...]


@dataclasses.dataclass(frozen=True)
class Run:
    model: str  # registry name, as typed (all-cnn-c)
    lr: float
    seed: int
    variant: Variant = ()

    def folder(self, root: Path) -> Path:
        unit = root / self.model / variant_name(self.variant) if self.variant else root / self.model
        return unit / f"lr{self.lr:g}-seed{self.seed}"


def variant_name(variant: Variant) -> str:
    """A combination as a folder name and a label: 'batch_size=256,weight_init=caffe-xavier'."""
    return ",".join(f"{key}={shown(value)}" for key, value in variant)


def shown(value) -> str:
    """A setting's value as --grid takes it: 200:250:300 for a list, 0.05, true."""
    return ":".join(map(str, value)) if isinstance(value, list | tuple) else f"{value:g}" if isinstance(value, float) \
        else str(value).lower() if isinstance(value, bool) else str(value)


def settings_of(variant: Variant) -> dict:
    """A combination as settings: its tuples back into the lists the settings hold."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in variant}


# Settings that --grid cannot vary: the ablation's own options vary them, or they name the ablation.
NOT_IN_GRID = {"model": "--models", "seed": "--seeds", "lr": "--lr-grid", "preset": "--preset"}


def parse_grid(items: list[str]) -> dict[str, list]:
    """'KEY=V1,V2' items (repeatable, a key once) -> {setting: [values]}, each value converted to the
    setting's type and checked as an option's is; a list setting's value is written 200:250:300."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--grid {item!r}: write KEY=V1,V2, e.g. --grid batch_size=128,256")
        if key in NOT_IN_GRID:
            raise ValueError(f"--grid {item!r}: {key} is varied by {NOT_IN_GRID[key]}, not --grid")
        if key in grid:
            raise ValueError(f"--grid names {key} twice: give all its values in one --grid {key}=V1,V2")
        grid[key] = [parse_setting(key, v.strip(), GRID) for v in values.split(",")]
        if len(set(map(shown, grid[key]))) < len(grid[key]):
            raise ValueError(f"--grid {item!r} repeats a value: give each once")
    return grid


def variants(grid: dict[str, list]) -> list[Variant]:
    """Every combination of the grid's values (one empty variant without a grid)."""
    frozen = [[tuple(v) if isinstance(v, list) else v for v in values] for values in grid.values()]
    return [tuple(zip(grid, values)) for values in itertools.product(*frozen)]


def select_models(family: str | None = None, patterns: list[str] | None = None) -> list[str]:
    """``family`` a, b or c (the four models of Table 3's block), or names / glob patterns;
    ``all`` is the twelve networks of Table 3 (families A, B, C; not the ImageNet net)."""
    if patterns == ["all"]:
        return [m for f in "abc" for m in FAMILIES[f]]
    if family is not None:
        if family.lower() not in FAMILIES:
            raise ValueError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")
        return FAMILIES[family.lower()]
    if not patterns:
        raise ValueError("name the models: --family a|b|c or --models all-cnn-c,model-c (globs allowed)")
    chosen = []
    for pattern in patterns:
        matches = fnmatch.filter(list_models(), pattern.replace("_", "-"))
        if not matches:
            matches = [resolve_name(pattern).replace("_", "-")]  # raises with a did-you-mean hint
        chosen += [m for m in matches if m not in chosen]
    return chosen


def seed_list(numbers: list[int]) -> list[int]:
    """--seeds as given -> the seeds: one number N is seeds 0 to N - 1, several are those seeds.
    Each seed is checked as --seed is (a bad one raises), and there are 1 to MAX_SEEDS."""
    if len(numbers) == 1 and not 1 <= numbers[0] <= MAX_SEEDS:
        raise ValueError(f"--seeds {numbers[0]} is not allowed: a count of seeds takes 1 to {MAX_SEEDS:,} "
                         "(each is a whole run of every model), e.g. 3; or give the seeds, e.g. 0,4,7")
    seeds = list(range(numbers[0])) if len(numbers) == 1 else numbers
    if not 1 <= len(seeds) <= MAX_SEEDS or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds takes 1 to {MAX_SEEDS:,} different seeds, e.g. 0,4,7, or a count, e.g. 3")
    for seed in seeds:
        check_values({"seed": seed}, {"seed": "--seeds"})
    return seeds


def planned_runs(models: list[str], grid: list[float], seeds: list[int], combos: list[Variant] = ((),)) -> list[dict]:
    """What the ablation trains, in order: each model and --grid combination over the rate grid
    with the first seed, then the other seeds at its chosen rate ("chosen" until the grid is done)."""
    units = [(m, v) for m in models for v in combos]
    later = grid[0] if len(grid) == 1 else "chosen"
    runs = [(m, v, lr, seeds[0]) for m, v in units for lr in grid] + [(m, v, later, s) for m, v in units
                                                                      for s in seeds[1:]]
    return [{"model": m, **({"settings": variant_name(v)} if v else {}), "lr": lr, "seed": seed}
            for m, v, lr, seed in runs]


def run_config(base: TrainConfig, run: Run, networks: dict[str, dict] | None = None) -> TrainConfig:
    """A run's settings: ``base`` with its model, rate, seed and combination, and the network
    options its model builds under the preset and the options given (``networks``, by model, from
    ``settings.model_network``; None: ``base``'s own)."""
    network = (networks or {}).get(run.model, {})
    return dataclasses.replace(base, model=run.model, lr=run.lr, seed=run.seed,
                               **{**network, **settings_of(run.variant)})


def check_plan(base: TrainConfig, models: list[str], rates: list[float], seeds: list[int],
               combos: list[Variant], networks: dict[str, dict] | None = None) -> list[TrainConfig]:
    """Every model under every combination checked whole, as ``allconv train`` checks a run, and
    the rate grid's need of a validation split -> the first run's settings of each, in plan order.
    The first problem raises, naming the model and combination."""
    for rate in rates:
        check_values({"lr": rate}, {"lr": "--lr-grid"})
    configs = []
    for model, variant in ((m, v) for m in models for v in combos):
        config = run_config(base, Run(model, rates[0], seeds[0], variant), networks)
        try:
            _check_run(config, dict.fromkeys(dict(variant), GRID), len(rates))
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{model} with {variant_name(variant)}: {err}" if variant else str(err)) from None
        configs.append(config)
    return configs


def _check_run(config: TrainConfig, origin: dict[str, str], rates: int):
    validate(config, origin)
    check_in_effect(config, origin, [GRID])
    if config.init is not None:
        check_weights_file(config.init)
    check_batch(config, 1)
    resolve_precision(config.precision, resolve_device(config.device))
    if rates > 1 and config.val_fraction <= 0:
        fix = "drop val_fraction=0 from --grid" if "val_fraction" in origin else "give --val-fraction, e.g. 0.1"
        raise ValueError(f"choosing among learning rates needs a validation split, and val_fraction is "
                         f"{config.val_fraction:g}: {fix} (a rate is never picked on the test set)")


def prepare(base: TrainConfig, models: list[str], grid: list[float], seeds: list[int], out: str | Path,
            jobs: int | None = None, settings_grid: dict[str, list] | None = None,
            networks: dict[str, dict] | None = None) -> dict:
    """Every check of an ablation, before any run starts (the dry run makes the same): each
    model under each combination as ``grid.check_plan`` checks it, --jobs, and a folder that holds
    another ablation -> {"plan": what ablation.json holds, "configs": each unit's first run's
    settings, "jobs": runs at once, "warning": a line to show, or None}."""
    settings_grid = settings_grid or {}
    configs = check_plan(base, models, grid, seeds, variants(settings_grid), networks)
    warning = check_jobs(jobs, base.device)
    plan = {"config": json.loads(base.to_json()), "models": models, "grid": grid, "seeds": seeds,
            **({"settings_grid": settings_grid} if settings_grid else {})}
    previous = Path(out) / PLAN_NAME
    if previous.is_file() and json.loads(previous.read_text()) != plan:
        raise ValueError(f"{out} holds an ablation with other settings ({PLAN_NAME}); "
                         "choose another --out, or repeat that ablation's command to continue it")
    return {"plan": plan, "configs": configs, "jobs": jobs or default_jobs(base.device), "warning": warning}
