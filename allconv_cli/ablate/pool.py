"""Training an ablation's runs: one run in a process of its own, several at once in a pool of
workers, spread over the GPUs; a signal or a failure stops them all at a checkpoint."""

from __future__ import annotations

import heapq
import json
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import torch

from allconv_cli.ablate.grid import Run, run_config
from allconv_cli.ablate.slots import device_slots
from allconv_cli.processes import WorkerPool, catch_signals
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.loop import ClassReluShut, TrainingStopped
from allconv_cli.train.run import train
from allconv_cli.train.run_folder import METRICS_NAME, RunFolder
from allconv_cli.train.settings import from_json
from allconv_cli.util import atomic_write_text, read_text

RESULT_NAME = "result.json"  # in a run's folder once it finished


def train_one(config_json: str, folder: str, device: str | None, time_limit: float | None = None,
              threads: int | None = None) -> dict:
    """Train (or resume) one run to the end, or to ``time_limit`` seconds from now, on ``threads``
    CPU threads (None: one per free core), and record its result; a worker process's job."""

    config = from_json(config_json)
    if device is not None:
        config.device = device
    folder = Path(folder)
    # A run that holds a checkpoint continues; one that finished training but died before its
    # result was written is only summarized (its final test evaluation runs again).
    try:
        summary = train(config, folder, from_checkpoint=RunFolder(folder).holds_run(), finished_ok=True,
                        time_limit=time_limit, threads=threads)
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


def run_in_slots(tasks: list | Callable[[], object | None], slots: list,
                 start: Callable[[object, object], Future | None]) -> Iterator[tuple[object, Future]]:
    """``start(task, slot)`` for each task on a free one of ``slots``, as slots free up: a task
    starts when one ends, on the slot that task held (the lowest-numbered free slot when several
    are free), so a GPU whose runs end early takes the next ones and no slot holds two tasks at
    once -> (task, its future) as each ends. ``tasks``: a list, or a function giving the next
    task or None for none now (asked again as each task ends). ``start`` returning None (a stop)
    starts no other task; those running are still waited for."""
    take = tasks if callable(tasks) else (lambda waiting=iter(tasks): next(waiting, None))
    free, running, stopped = list(range(len(slots))), {}, False
    while True:
        while free and not stopped and (task := take()) is not None:
            slot = heapq.heappop(free)
            future = start(task, slots[slot])
            if future is None:
                stopped = True
                heapq.heappush(free, slot)
                break
            running[future] = task, slot
        if not running:
            return
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            task, slot = running.pop(future)
            heapq.heappush(free, slot)
            yield task, future


def execute(base: TrainConfig, take: Callable[[], Run | None], release: Callable[[Run], None], out: Path,
            jobs: int, results: dict, progress, time_left: Callable[[], float | None],
            networks: dict[str, dict] | None = None):
    """Train the runs that ``take`` gives until it gives None, ``jobs`` at once, each handed back
    to ``release`` when it ends; results into ``results``."""
    if jobs > 1:
        _execute_in_workers(base, take, release, out, jobs, results, progress, time_left, networks)
        return
    with catch_signals() as caught:  # train() takes this list: a stop during a run ends it at a checkpoint
        while not caught and (run := take()) is not None:
            progress("run", run=run)
            try:
                results[run] = train_one(run_config(base, run, networks).to_json(), str(run.folder(out)), None,
                                         time_left())
            finally:
                release(run)
            progress("done", run=run, result=results[run])
        if caught:  # between runs: no other starts
            raise TrainingStopped(caught[0], out)


def _execute_in_workers(base: TrainConfig, take, release, out: Path, workers: int, results: dict, progress,
                        time_left, networks: dict[str, dict] | None):
    """The runs in ``workers`` processes. A signal here is forwarded to every worker (each stops
    its run at a checkpoint) and starts no other run; so does a run that fails or is stopped (a
    signal sent to its worker alone). Every running run is waited for, then the stop (TrainingStopped)
    or the first failure is raised; a second signal kills the workers at once."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    ended_early: list[BaseException] = []  # the failed or stopped runs' errors
    with WorkerPool(_worker_init, (threads,)) as pool, catch_signals(forward=pool.send_signal) as caught:

        def next_run() -> Run | None:
            return None if caught or ended_early else take()

        def start(run: Run, device: str | None) -> Future:
            progress("run", run=run)
            return pool.submit(train_one, run_config(base, run, networks).to_json(), str(run.folder(out)), device,
                               time_left(), threads)

        for run, future in run_in_slots(next_run, device_slots(base.device, workers), start):
            release(run)
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
