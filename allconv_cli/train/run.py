"""A training run from its settings: the data and model it builds, the process group, signals,
evaluation after epochs, and the summary; ``train`` and ``resume`` are the entry points."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from allconv_cli.cpu_threads import ThreadWatch, use_threads
from allconv_cli.data import datasets
from allconv_cli.data.batches import Batches
from allconv_cli.data.images import fit_options
from allconv_cli.device import resolve_device, resolve_precision, tune_cpu_allocator
from allconv_cli.evaluate import evaluate, paper_error
from allconv_cli.files.weights import load_state, load_weights
from allconv_cli.models.initialization import (
    WHITEN_IMAGES,
    dirac,
    initialize,
    whiten_first_conv,
)
from allconv_cli.models.registry import default_config, network_name, resolve_name
from allconv_cli.processes import TIME_LIMIT, catch_signals
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.learner import Learner, Setup, make_learner, make_model, memory_format, place_model
from allconv_cli.train.loop import Position, Progress, finished, fit, not_learning
from allconv_cli.train.run_folder import RESUME_MAY_CHANGE, RunFolder
from allconv_cli.train.settings import OPTIONS, check_values, model_kwargs

LSUV_IMAGES = 64  # training images the lsuv initialization measures variances on


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def build(config: TrainConfig, device: torch.device, rank: int = 0, world: int = 1,
          preprocess_state: tuple[dict, dict] | None = None) -> Setup:
    """Load the data, fit (or restore) the preprocessing, and build the model on ``device``."""
    registered = default_config(resolve_name(config.model))
    input_size = tuple(registered["input_size"])
    init = None
    if config.init is not None and preprocess_state is None:  # a resumed run restores its own state
        init = load_weights(config.init)
        if init[1]["preprocess"]["kind"] != config.preprocess:
            raise ValueError(f"--init {config.init} was trained on {init[1]['preprocess']['kind']} inputs: "
                             f"give --preprocess {init[1]['preprocess']['kind']}")
        preprocess_state = (init[1]["preprocess"], init[2])  # the inputs its weights were learned for
    data = datasets.run_data(config, input_size, fit_options(registered), preprocess_state)
    model = make_model(config, len(data.classes))
    if init is not None:
        load_state(model, init[0], f"--init {config.init} holds {init[1]['model'].replace('_', '-')} with "
                                   f"{init[1].get('model_kwargs')}, which does not fit {config.model} with these settings")
    if data.fit_images is not None:  # a fresh start: neither resumed nor from --init weights
        initialize(model, config.weight_init, data.preprocess(data.fit_images[:LSUV_IMAGES].float() / 255))
        if config.whiten != "off":
            whiten_first_conv(model, data.preprocess(data.fit_images[:WHITEN_IMAGES].float() / 255))
        if config.dirac:
            dirac(model)
    model = place_model(model, config, device)
    per_rank = max(1, config.batch_size // world)

    def batches(split, shuffle):
        return Batches(split, per_rank, shuffle=shuffle, drop_last=shuffle, seed=config.seed,
                                rank=rank, world=world, device=device, workers=config.workers)

    evaluate_on = data.validation if data.validation is not None else data.test
    return Setup(model, data.preprocess.to(device), data.classes, input_size, batches(data.train, True),
                 batches(evaluate_on, False), batches(data.test, False) if data.validation is not None else None)


def train(config: TrainConfig, run_dir: str | Path, progress: Progress | None = None, from_checkpoint: bool = False,
          stop_after: int | None = None, replace: bool = False, finished_ok: bool = False,
          time_limit: float | None = None, threads: int | None = None) -> dict:
    """Train ``config`` into ``run_dir``, or continue it there ``from_checkpoint`` -> summary.

    A new run refuses a folder holding one unless ``replace``. ``stop_after`` ends this call,
    resumably, after that many epochs; ``time_limit`` (seconds from now) ends it before then, with
    the checkpoint written (TrainingStopped with signum TIME_LIMIT). SIGINT / SIGTERM / SIGHUP
    write a resumable checkpoint and raise TrainingStopped. ``finished_ok`` lets continuing a
    finished run just summarize it. ``threads``: the CPU threads (None: one per free core,
    followed as the run goes; ``cpu_threads``).
    """
    if stop_after is not None and not 1 <= stop_after <= config.epochs:
        raise ValueError(f"--stop-after {stop_after} is not allowed: it takes 1 to the run's {config.epochs} epochs")
    stop_at = None if time_limit is None else time.monotonic() + time_limit - time_reserve(time_limit)
    run = RunFolder(run_dir)
    rank, world, local_rank = _distributed()
    check_batch(config, world)
    progress = progress if progress is not None and rank == 0 else None
    device = _start(config, world, local_rank)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # of this run on this machine
    choice = use_threads(threads, processes, fixed=config.deterministic)
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
    try:
        with run.lock() if rank == 0 else contextlib.nullcontext():
            state = run.read_state(config) if from_checkpoint else None
            if state is not None and finished(json.loads(state["history"]), config.epochs) and not finished_ok:
                raise ValueError(f"{run.path} already finished (all {config.epochs} epochs, or its --target); "
                                 "nothing to resume (start a new run, e.g. with --epochs)")
            if state is None and rank == 0:
                run.refuse_a_run(replace or from_checkpoint)  # before loading data, which can take minutes
            _seed(config)
            setup = build(config, device, rank, world, state["preprocess"] if state else None)
            if rank:  # every rank built the same model; dropout now draws per process (rank 0 goes on as one process)
                torch.manual_seed(config.seed + rank)
            if state is None and rank == 0:  # after build: a run whose data fails to load writes nothing
                run.begin(config, replace or from_checkpoint, environment={"cpu_threads": choice.record()})  # a resume without state.pt restarts from scratch
            learner = make_learner(config, setup.model, setup.preprocess, len(setup.classes), len(setup.train),
                                   rank, world)
            position = run.restore(learner, state, rank, world) if state else Position()
            if progress is not None:
                progress("start", config=config, run_dir=run.path, classes=setup.classes, steps=len(setup.train),
                         network=network_name(config.model, model_kwargs(config, len(setup.classes)))[0],
                         start_epoch=position.epoch, examples=len(setup.train.data), device=str(device), world=world,
                         threads=choice.describe(),
                         batch_per_process=setup.train.batch_size, sync_batch_norm=world > 1 and config.batch_norm)
            started = time.perf_counter()
            with _catch_signals(stop_at) as caught:
                position = fit(learner, setup.train, position, config.epochs,
                               evaluate_epoch=_evaluator(learner, setup, config), stop=caught, stop_after=stop_after,
                               save=lambda at: run.save(learner, at, setup, world), progress=progress,
                               record=run.write_metrics if rank == 0 else None,
                               world=world, run_dir=run.path, threads=ThreadWatch(choice, processes))
            return _summary(learner, setup, config, run, position, time.perf_counter() - started)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resume(run_dir: str | Path, progress: Progress | None = None, stop_after: int | None = None,
           time_limit: float | None = None, threads: int | None = None, **changes) -> dict:
    """Continue the run in ``run_dir`` with its saved settings: ``changes`` may name only
    RESUME_MAY_CHANGE, checked as the options are (any other key, a setting or not, is refused
    with its option's name)."""
    refused = [key for key in changes if key not in RESUME_MAY_CHANGE]
    if refused:
        raise ValueError("--resume continues with the run's saved settings; drop "
                         + ", ".join("--" + key.replace("_", "-") for key in refused))
    config = RunFolder(run_dir).read_config()
    for key, value in check_values(changes, dict.fromkeys(changes, OPTIONS)).items():
        setattr(config, key, value)
    return train(config, run_dir, progress=progress, from_checkpoint=True, stop_after=stop_after, time_limit=time_limit,
                 threads=threads)


def check_batch(config: TrainConfig, world: int):
    """Refuse a batch that ``--augment strong`` cannot mix: timm's Mixup pairs each image with
    another of the same process's batch, so that batch (``batch_size // world``) must be even."""
    per_process = config.batch_size // world
    if config.augment != "strong" or per_process % 2 == 0:
        return
    step = 2 * world  # global batches whose share is even on every process
    lower, upper = config.batch_size // step * step, (config.batch_size // step + 1) * step
    spread = f" over {world} processes gives {per_process} each" if world > 1 else " is odd"
    raise ValueError(f"--augment strong mixes pairs of images and needs an even batch per process: --batch-size "
                     f"{config.batch_size}{spread}; give --batch-size {upper}"
                     + (f" or {lower}" if lower else ""))


def _start(config: TrainConfig, world: int, local_rank: int) -> torch.device:
    """Pick the device (under torchrun a GPU per process, checked against the machine's count),
    join the process group and tune the CPU allocator."""
    device = resolve_device(config.device, local_rank if world > 1 else None)
    if device.type == "cuda" and world > 1:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        tune_cpu_allocator()
    return device


def _evaluator(learner: Learner, setup: Setup, config: TrainConfig) -> Callable[[int], dict]:
    """After an epoch: the evaluation split's loss and errors, every eval_every epochs and at the
    end (every epoch with a target); the last epoch's also with the run's test-time augmentation."""
    split = "val" if setup.test is not None else "test"

    def after(epoch: int) -> dict:
        last = epoch + 1 == config.epochs
        if (epoch + 1) % config.eval_every and not last and config.target is None:
            return {}
        return {f"{split}{suffix}_{key}": value for suffix, scores in _scores(learner, setup, config, setup.evaluate,
                                                                              with_tta=last).items()
                for key, value in scores.items()}

    return after


def _scores(learner: Learner, setup: Setup, config: TrainConfig, batches: Batches, with_tta: bool) -> dict:
    """Loss and errors on ``batches``: plain under "", and (``with_tta``) with the run's test-time
    augmentation under "_tta"."""
    scores = {}
    for tta in ("none", config.tta) if with_tta and config.tta != "none" else ("none",):
        result = evaluate(learner.eval_model, batches, setup.preprocess, len(setup.classes), tta=tta,
                          precision=config.precision, memory_format=memory_format(config))
        scores["" if tta == "none" else "_tta"] = {key: result[key] for key in ("loss", "top1_error", "top5_error")}
    return scores


def _summary(learner: Learner, setup: Setup, config: TrainConfig, run: RunFolder, position: Position,
             seconds: float) -> dict:
    """What the run reached; the test split is read once, at the end of a run that held out a
    validation split."""
    done = finished(position.history, config.epochs)
    summary = {"run_dir": str(run.path), "model": config.model, "dataset": config.dataset,
               "epochs_done": position.epoch, "epochs": config.epochs, "finished": done, "seconds": seconds,
               "processes": setup.train.world, "batch_per_process": setup.train.batch_size,
               "precision": config.precision, "last": position.history[-1] if position.history else {},
               "network": network_name(config.model, model_kwargs(config, len(setup.classes)))[0],
               "paper_error": paper_error(config.model, model_kwargs(config, len(setup.classes)), config.dataset,
                                          setup.classes, config.augment)}
    if position.history and (warning := not_learning(position.history[-1], len(setup.classes), learner.model.batch_norm)):
        summary["not_learning"] = warning
    if config.target is not None and done and position.history[-1].get("target_reached"):
        summary["target"] = {"accuracy": config.target, "epoch": position.epoch,
                             "wall_seconds": position.history[-1]["wall_seconds"]}
    if setup.test is not None and done:
        summary.update({f"test{suffix}": scores for suffix, scores in _scores(learner, setup, config, setup.test,
                                                                               with_tta=True).items()})
    return summary


def _seed(config: TrainConfig):
    torch.manual_seed(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def time_reserve(time_limit: float) -> float:
    """Seconds before a time limit at which a run stops, so that its last steps, its epoch's
    evaluation and its checkpoint end before the limit: 5 s and 5 % of the time, at most 2 min."""
    return min(120.0, 5 + 0.05 * time_limit)


@contextlib.contextmanager
def _catch_signals(stop_at: float | None = None):
    """``processes.catch_signals``, and at ``stop_at`` (time.monotonic()) TIME_LIMIT recorded as
    if it were a signal."""
    with catch_signals() as caught:
        timer = None
        if stop_at is not None:
            timer = threading.Timer(max(0.0, stop_at - time.monotonic()),
                                    lambda: caught or caught.append(TIME_LIMIT))
            timer.daemon = True
            timer.start()
        try:
            yield caught
        finally:
            if timer is not None:
                timer.cancel()


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``root/MODEL-DATASET-TIME``, with ``-2``, ``-3``... where runs started in the same second."""
    base = Path(root) / f"{resolve_name(config.model).replace('_', '-')}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
