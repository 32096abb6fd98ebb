"""The paper's ablation (Table 3) as a resumable set of training runs.

Each model is trained under one protocol. With a learning-rate grid, every rate is trained with
the first seed on a validation split held out of the training set (never the test set); the
rate with the lowest validation error is then trained with the remaining seeds. The table
reports, per model, the chosen rate and the test error's mean and spread over seeds.

Layout of an ablation folder: ``ablation.json`` (the plan), one run folder per
(model, rate, seed) as ``MODEL/lr{rate}-seed{seed}/``, each with ``result.json`` once finished,
and ``table.md``, ``table.csv``, ``table.json``, ``chart.png``. Running the same command again
skips finished runs and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import heapq
import io
import itertools
import json
import math
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import torch

from allconv_cli import benchmark
from allconv_cli.charts import ablation_bars
from allconv_cli.data import datasets, folders
from allconv_cli.device import resolve_device
from allconv_cli.evaluate import paper_setting
from allconv_cli.models.registry import (
    NETWORKS,
    create_model,
    list_models,
    resolve_name,
)
from allconv_cli.processes import WorkerPool, catch_signals
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.loop import ClassReluShut, TrainingStopped
from allconv_cli.train.run import train
from allconv_cli.train.run_folder import METRICS_NAME, RunFolder
from allconv_cli.train.settings import check_values, from_json, parse_setting, validate
from allconv_cli.util import atomic_write_text, read_text

PAPER_GRID = (0.25, 0.1, 0.05, 0.01)  # Section 3.2
# (train, test) images of the data sets whose size is fixed: a dry run counts without reading them
SPLIT_IMAGES = {"sample": (4_000, 1_000), "cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}
RESULT_NAME, PLAN_NAME = "result.json", "ablation.json"
# Runs at once on each GPU by default: 4 runs at once each trained at a single run's speed on one
# H200 (2026-12-04); a step is bound by kernel launches, not by the GPU's arithmetic.
RUNS_PER_GPU = 4
MAX_SEEDS = 1_000  # seeds of one ablation: each is a whole training run of every model
# Table 3's blocks, as the registry's rows say: family -> its models, as typed (all-cnn-c)
FAMILIES = {family: [name.replace("_", "-") for name, row in NETWORKS.items() if row.family == family]
            for family in sorted({row.family for row in NETWORKS.values() if row.family})}


Variant = tuple[tuple[str, object], ...]  # ((setting, value), ...): one combination of --grid, in its order


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
    return ",".join(f"{key}={_shown(value)}" for key, value in variant)


def _shown(value) -> str:
    return ":".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
        else str(value).lower() if isinstance(value, bool) else str(value)


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
        grid[key] = [parse_setting(key, v.strip(), "--grid") for v in values.split(",")]
        if len(set(map(_shown, grid[key]))) < len(grid[key]):
            raise ValueError(f"--grid {item!r} repeats a value: give each once")
    return grid


def variants(grid: dict[str, list]) -> list[Variant]:
    """Every combination of the grid's values (one empty variant without a grid)."""
    return [tuple(zip(grid, values)) for values in itertools.product(*grid.values())]


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


def cost(config: TrainConfig, models: list[str], grid: list[float], seeds: list[int],
         train_images: int, combos: int = 1) -> dict:
    """Runs, epochs and training images the ablation will process (grid, then seeds), over
    ``combos`` combinations of --grid."""
    runs = len(models) * combos * (len(grid) + len(seeds) - 1)
    return {"runs": runs, "epochs": runs * config.epochs,
            "training_images": runs * config.epochs * train_images}


def split_sizes(config: TrainConfig) -> dict[str, int]:
    """Images one run trains on (an epoch), evaluates on (over the whole run) and the test
    images among those, without reading any: the known sizes of sample and CIFAR, or the files
    of an image folder, counted. Limits and the validation split are applied as training does."""

    datasets.check_source(config.dataset, config.data_dir)
    if config.dataset in SPLIT_IMAGES:
        train, test = SPLIT_IMAGES[config.dataset]
    else:
        if config.data_dir is None:
            raise ValueError("--dataset imagefolder needs --data-dir DIR (with train/ and val/ or test/)")
        root = Path(config.data_dir)
        # the same folders and scan (and the same errors for a wrong layout) as training's, without decoding
        train, test = (len(folders.scan_folder(root / name)[1]) for name in folders.split_folders(root, "train"))
    train, test = min(train, config.train_limit or train), min(test, config.test_limit or test)
    val = round(train * config.val_fraction)
    evaluations = math.ceil(config.epochs / config.eval_every)  # the last epoch is always evaluated
    # with a validation split, each evaluation scores it and test is scored once at the end
    evaluated_images = evaluations * val + test if val else evaluations * test
    return {"train": train - val, "evaluated": evaluated_images, "test": test}


def estimate_seconds(config: TrainConfig, models: list[str], grid: list[float], seeds: list[int],
                     sizes: dict[str, int], combos: int = 1) -> dict:
    """The ablation's duration from speeds measured here: one timed training step of each model
    with the runs' own recipe (``allconv benchmark``'s train mode: its optimizer, lookahead,
    precision, batch size and device, after one warm-up step, on synthetic data); evaluation at
    that speed scaled by the forward pass's share of a training step's FLOPs, for each of ``combos``
    combinations of --grid alike. Assumes full-size images (--crop epochs are cheaper)."""
    per_model, total = {}, 0.0
    for model in models:
        recipe = dataclasses.replace(config, model=model, batch_size=min(config.batch_size, max(1, sizes["train"])))
        measured = benchmark.run(recipe, "train", steps=1, warmup=1)
        train_speed = measured["results"]["train"]["images_per_s"]
        flops = measured["gflop_per_image"]
        eval_speed = train_speed * flops["train"] / flops["forward"]
        runs = combos * (len(grid) + len(seeds) - 1)
        seconds = runs * (config.epochs * sizes["train"] / train_speed + sizes["evaluated"] / eval_speed)
        per_model[model] = {"images_per_s": train_speed, "seconds": seconds}
        total += seconds
    return {"seconds": total, "per_model": per_model, "device": measured["device"],
            "device_name": measured["device_name"], "precision": measured["precision"],
            "measured": "one training step per model after one warm-up step, synthetic data"}


def run_config(base: TrainConfig, run: Run) -> TrainConfig:
    return dataclasses.replace(base, model=run.model, lr=run.lr, seed=run.seed, **dict(run.variant))


def _train_one(config_json: str, folder: str, device: str | None, time_limit: float | None = None) -> dict:
    """Train (or resume) one run to the end, or to ``time_limit`` seconds from now, and record
    its result; a worker process's job."""

    config = from_json(config_json)
    if device is not None:
        config.device = device
    folder = Path(folder)
    # A run that holds a checkpoint continues; one that finished training but died before its
    # result was written is only summarized (its final test evaluation runs again).
    try:
        summary = train(config, folder, from_checkpoint=RunFolder(folder).holds_run(), finished_ok=True,
                        time_limit=time_limit)
    except ClassReluShut as shut:  # a result all the same: a recipe whose runs die is what a grid can show
        last = json.loads(read_text(folder / METRICS_NAME).splitlines()[-1])
        summary = {"last": last, "seconds": last["wall_seconds"], "epochs_done": last["epoch"], "shut": str(shut)}
    last = summary["last"]
    # a run that died has no final test evaluation: its last evaluated error stands for it
    test = summary.get("test") or {"top1_error": last.get("test_top1_error", last.get("val_top1_error"))}
    result = {"model": config.model, "lr": config.lr, "seed": config.seed,
              "val_error": last.get("val_top1_error"), "test_error": test["top1_error"],
              "seconds": summary["seconds"], "epochs": summary["epochs_done"],
              **({"class_relu_shut": summary["shut"]} if "shut" in summary else {})}
    atomic_write_text(folder / RESULT_NAME, json.dumps(result, indent=2))
    return result


def _worker_init(threads: int):

    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class Share:
    """Which runs this call trains: the ``index``-th of ``count`` shares (1-based; --shard K/N),
    runs dealt round-robin in the plan's order, so that N jobs with a shared --out split an
    ablation; and the wall-clock ``deadline`` (time.monotonic()) its runs stop before, or None."""

    index: int = 1
    count: int = 1
    deadline: float | None = None

    def mine(self, position: int) -> bool:
        return position % self.count == self.index - 1

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4)."""
    index, sep, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        index = count = 0
    if not sep or not 1 <= index <= count:
        raise ValueError(f"--shard {text!r}: write K/N with 1 <= K <= N, e.g. --shard 1/2 for the first of two jobs")
    return index, count


def ablate(base: TrainConfig, models: list[str], grid: list[float], seeds: list[int], out: str | Path,
           jobs: int | None = None, progress: Callable[..., None] | None = None,
           settings_grid: dict[str, list] | None = None, share: Share = Share()) -> list[dict] | None:
    """Run (or continue) the ablation in ``out``, ``jobs`` runs at once (None: ``default_jobs``),
    each model under each combination of ``settings_grid`` -> one row per model and combination
    (see ``table_rows``), or None where this share's runs are done but others' are not yet."""
    out = Path(out)
    progress = progress or (lambda event, **fields: None)
    resolve_device(base.device)  # a device this machine lacks is refused before any run starts
    most = max(os.cpu_count() or 1, default_jobs(base.device))  # each run needs a core to drive it
    if jobs is not None and not 1 <= jobs <= most:
        raise ValueError(f"--jobs {jobs} is not allowed; --jobs takes 1 to {most} here (a run at once per CPU core, "
                         f"or {RUNS_PER_GPU} per GPU; leave it out for {RUNS_PER_GPU} runs per GPU, or 1 on the CPU)")
    jobs = jobs or default_jobs(base.device)
    if len(grid) > 1 and base.val_fraction <= 0:
        raise ValueError("choosing among learning rates needs a validation split: give --val-fraction, e.g. 0.1")
    settings_grid = settings_grid or {}
    units = [(m, v) for m in models for v in variants(settings_grid)]
    for model, variant in units:  # every combination is a valid recipe, before any run starts
        validate(run_config(base, Run(model, grid[0], seeds[0], variant)), dict.fromkeys(dict(variant), "--grid"))
    _record_plan(out, {"config": json.loads(base.to_json()), "models": models, "grid": grid, "seeds": seeds,
                       **({"settings_grid": settings_grid} if settings_grid else {})})
    results: dict[Run, dict] = {}
    phase_one = [Run(m, lr, seeds[0], v) for m, v in units for lr in grid]
    _execute(base, [r for i, r in enumerate(phase_one) if share.mine(i)], out, jobs, results, progress, share)
    _collect(phase_one, out, results)
    # a unit's rate: the grid's one, or the best on validation once all its grid runs are done (by any share)
    chosen = {unit: min(grid, key=lambda lr: _selection_error(results.get(Run(unit[0], lr, seeds[0], unit[1]))))
              for unit in units if len(grid) == 1 or all(Run(unit[0], lr, seeds[0], unit[1]) in results
                                                         for lr in grid)}
    phase_two = [(unit, s) for unit in units for s in seeds[1:]]
    mine = [Run(m, chosen[(m, v)], s, v) for i, ((m, v), s) in enumerate(phase_two, len(phase_one))
            if share.mine(i) and (m, v) in chosen]
    _execute(base, mine, out, jobs, results, progress, share)
    runs = [Run(m, chosen[(m, v)], s, v) for (m, v), s in phase_two if (m, v) in chosen]
    _collect(runs, out, results)
    if len(chosen) < len(units) or len(results) < len(phase_one) + len(phase_two):
        return None  # another share's runs are not finished: the last call to finish writes the table
    rows = table_rows(units, chosen, seeds, results, base)
    write_tables(rows, out)
    return rows


def _record_plan(out: Path, plan: dict):
    """Write ``ablation.json``, or refuse a folder that holds another ablation's."""
    previous = out / PLAN_NAME
    if previous.is_file() and json.loads(previous.read_text()) != plan:
        raise ValueError(f"{out} holds an ablation with other settings ({PLAN_NAME}); "
                         "choose another --out, or repeat that ablation's command to continue it")
    atomic_write_text(previous, json.dumps(plan, indent=2))


def _collect(runs: list[Run], out: Path, results: dict):
    """Add the results that other shares (or earlier calls) wrote for ``runs``."""
    for run in runs:
        done = run.folder(out) / RESULT_NAME
        if run not in results and done.is_file():
            results[run] = json.loads(done.read_text())


def _selection_error(result: dict | None) -> float:
    if result is None:  # the grid's one rate, whose run another share trains
        return math.inf
    error = result["val_error"] if result["val_error"] is not None else result["test_error"]
    return math.inf if error is None or math.isnan(error) else error


def _execute(base: TrainConfig, runs: list[Run], out: Path, jobs: int, results: dict, progress, share: Share):
    _collect(runs, out, results)  # finished by an earlier call or another share
    pending = [run for run in runs if run not in results]
    for run in runs:
        if run in results:
            progress("skip", run=run, result=results[run])
    if jobs > 1 and len(pending) > 1:
        _execute_in_workers(base, pending, out, min(jobs, len(pending)), results, progress, share)
        return
    with catch_signals() as caught:  # train() takes this list: a stop during a run ends it at a checkpoint
        for run in pending:
            if caught:  # between runs: no other starts
                raise TrainingStopped(caught[0], out)
            progress("run", run=run)
            results[run] = _train_one(run_config(base, run).to_json(), str(run.folder(out)), None, share.time_left())
            progress("done", run=run, result=results[run])


def _execute_in_workers(base: TrainConfig, pending: list[Run], out: Path, workers: int, results: dict, progress,
                        share: Share):
    """The runs in ``workers`` processes. A signal here is forwarded to every worker (each stops
    its run at a checkpoint) and starts no other run; so does a run that fails or is stopped (a
    signal sent to its worker alone). Every running run is waited for, then the stop (TrainingStopped)
    or the first failure is raised; a second signal kills the workers at once."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    ended_early: list[BaseException] = []  # the failed or stopped runs' errors
    with WorkerPool(_worker_init, (threads,)) as pool, catch_signals(forward=pool.send_signal) as caught:

        def start(run: Run, device: str | None) -> Future | None:
            if caught or ended_early:
                return None
            progress("run", run=run)
            return pool.submit(_train_one, run_config(base, run).to_json(), str(run.folder(out)), device,
                               share.time_left())

        for run, future in run_in_slots(pending, device_slots(base.device, workers), start):
            if future.exception() is None:
                results[run] = future.result()
                progress("done", run=run, result=results[run])
                continue
            if not caught and not ended_early:
                pool.send_signal(signal.SIGTERM)  # the other runs stop at a checkpoint
            ended_early.append(future.exception())
    failure = next((e for e in ended_early if not isinstance(e, TrainingStopped)), None)
    if failure is not None and not caught:
        raise failure
    if caught or ended_early:
        raise TrainingStopped(caught[0] if caught else ended_early[0].signum, out)


def default_jobs(device: str) -> int:
    """Runs at once when --jobs is not given: RUNS_PER_GPU on each GPU the runs may use (every GPU
    for ``device`` auto or cuda, the one of cuda:N); 1 on the CPU, whose cores one run fills."""
    if device == "cpu" or not torch.cuda.is_available():
        return 1
    return RUNS_PER_GPU * (torch.cuda.device_count() if device in ("auto", "cuda") else 1)


def device_slots(device: str, jobs: int) -> list[str | None]:
    """The device of each of ``jobs`` slots (a slot trains one run at a time): the GPUs in turn,
    cuda:0, cuda:1, ..., cuda:0, ..., where ``device`` (auto or cuda) lets the runs use every
    GPU, so that runs spread over them; else None, each run on ``device`` itself."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return [f"cuda:{i % gpus}" for i in range(jobs)]
    return [None] * jobs


def run_in_slots(tasks: list, slots: list,
                 start: Callable[[object, object], Future | None]) -> Iterator[tuple[object, Future]]:
    """``start(task, slot)`` for each of ``tasks`` on a free one of ``slots``, as slots free up:
    a task starts when one ends, on the slot that task held (the lowest-numbered free slot when
    several are free), so a GPU whose runs end early takes the next ones and no slot holds two
    tasks at once -> (task, its future) as each ends. ``start`` returning None (a stop) starts
    no other task; those running are still waited for."""
    waiting, free, running = list(tasks), list(range(len(slots))), {}
    while waiting or running:
        while waiting and free:
            slot = heapq.heappop(free)
            future = start(waiting[0], slots[slot])
            if future is None:
                waiting.clear()
                heapq.heappush(free, slot)
                break
            running[future] = waiting.pop(0), slot
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            task, slot = running.pop(future)
            heapq.heappush(free, slot)
            yield task, future


# The paper's figure for a run's protocol, by the key ``evaluate.paper_setting`` returns: the setting it was measured in
PROTOCOLS = {"cifar10": "Table 3: 350 epochs, no augmentation",
             "cifar10-aug": "with flips and translations",
             "cifar100": "CIFAR-100, no augmentation"}


def paper_key(base: TrainConfig) -> str | None:
    """Which of the paper's figures the runs compare with (see ``evaluate.paper_setting``): an image
    folder's classes are read from its train/ folder's names, without loading an image."""
    classes = []
    if base.dataset == "imagefolder" and base.data_dir is not None:
        classes = folders.class_names(Path(base.data_dir) / "train")
    return paper_setting(base.dataset, classes, base.augment)


def table_rows(units: list[tuple[str, Variant]], chosen: dict, seeds: list[int], results: dict,
               base: TrainConfig) -> list[dict]:
    """One row per model and --grid combination (its settings as columns): test error's mean and
    spread (None for one seed: one run has no spread), the paper's Table 3 figure on CIFAR-10 and
    its figure for the run's protocol, if any."""
    key = paper_key(base)
    rows = []
    for model, variant in units:
        errors = [results[Run(model, chosen[(model, variant)], s, variant)]["test_error"] for s in seeds]
        python_name = resolve_name(model)
        paper = NETWORKS[python_name].paper_error
        table3 = paper.get("cifar10") if key in ("cifar10", "cifar10-aug") else None
        mean = statistics.fmean(errors)
        reference = table3 if table3 is not None else paper.get(key)
        rows.append({
            "model": model,
            **{setting: value for setting, value in variant},
            "params": sum(p.numel() for p in create_model(python_name).parameters()),
            "paper_params": NETWORKS[python_name].paper_params,
            "lr": chosen[(model, variant)],
            "test_error_mean": mean,
            "test_error_std": statistics.stdev(errors) if len(errors) > 1 else None,
            "seeds": len(errors),
            "paper_table3": table3,
            "paper_error": paper.get(key) if key is not None else None,
            "paper_protocol": PROTOCOLS.get(key),
            "difference": None if reference is None else mean - reference,
        })
    return rows


def paper_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(row key, label) of the paper's columns to show: Table 3's whenever the runs are on CIFAR-10,
    and the protocol's own beside it where that is another of the paper's settings."""
    protocol = rows[0]["paper_protocol"]
    columns = [("paper_table3", f"paper, {PROTOCOLS['cifar10']}")]
    if protocol != PROTOCOLS["cifar10"]:
        columns.append(("paper_error", f"paper, {protocol}"))
    return [(key, label) for key, label in columns if any(r[key] is not None for r in rows)]


def grid_columns(rows: list[dict]) -> list[str]:
    """The --grid settings the rows vary: their keys between "model" and "params"."""
    keys = list(rows[0])
    return keys[1:keys.index("params")]


def row_label(row: dict) -> str:
    """'all-cnn-c', or 'all-cnn-c, batch_size=256' for a row of a --grid combination."""
    return ", ".join([row["model"], *(f"{key}={_shown(row[key])}" for key in grid_columns([row]))])


def markdown_table(rows: list[dict]) -> str:
    columns = paper_columns(rows)
    settings = grid_columns(rows)
    table3 = any(r["paper_table3"] is not None for r in rows)
    header = ["model", *settings, "params", "paper's params", "lr", "test error %",
              *(f"{label} %" for _, label in columns), f"difference from {'Table 3' if table3 else 'the paper'}"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * len(settings) + "---:|" * (len(header) - 1 - len(settings))]
    for r in rows:
        error = (f"{r['test_error_mean']:.2f} (1 seed)" if r["test_error_std"] is None
                 else f"{r['test_error_mean']:.2f} ± {r['test_error_std']:.2f} ({r['seeds']} seeds)")
        cells = [r["model"], *(_shown(r[key]) for key in settings), f"{r['params']:,}", r["paper_params"] or "",
                 f"{r['lr']:g}", error]
        cells += ["" if r[key] is None else f"{r[key]:.2f}" for key, _ in columns]
        cells += ["" if r["difference"] is None else f"{r['difference']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path):
    """table.md, table.csv, table.json and chart.png in ``out``."""

    atomic_write_text(out / "table.md", markdown_table(rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "table.csv", buffer.getvalue())
    atomic_write_text(out / "table.json", json.dumps(rows, indent=2))
    ablation_bars(rows, [row_label(r) for r in rows], paper_columns(rows), out / "chart.png")
