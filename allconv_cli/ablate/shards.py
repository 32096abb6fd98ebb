"""Which process trains which run of an ablation, however many work on its folder at once.

Runs are dealt round-robin to the N shares of --shard K/N, in the plan's order. A process claims
a run before training it (a lock on a file under ``.claims/``, which the kernel releases when the
process dies), so that no run is trained twice at once. It trains its own share's runs, and those
of shares that have left: a process leaves (``.claims/left-K-of-N``) when no run is left for it
now, its own waiting on a rate grid that others are training. Claims and leaving happen under one
lock on the folder, so the process that finishes last sees every other one gone and trains what
they left: the table is complete, and the same as one job's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import time
from pathlib import Path

from allconv_cli.ablate.grid import Run, Variant
from allconv_cli.ablate.pool import RESULT_NAME

CLAIMS = ".claims"  # under an ablation's folder


@dataclasses.dataclass(frozen=True)
class Share:
    """Which runs this call trains first: the ``index``-th of ``count`` shares (1-based; --shard
    K/N), runs dealt round-robin in the plan's order, so that N jobs with a shared --out split an
    ablation; and the wall-clock ``deadline`` (time.monotonic()) its runs stop before, or None."""

    index: int = 1
    count: int = 1
    deadline: float | None = None

    def owner(self, position: int) -> int:
        return position % self.count + 1

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


class Queue:
    """The ablation's runs in ``out``, as any process working on it finds them: results read from
    the run folders, rates chosen where a unit's grid is done, runs claimed one at a time."""

    def __init__(self, out: Path, units: list[tuple[str, Variant]], grid: list[float], seeds: list[int],
                 share: Share):
        self.out, self.units, self.grid, self.seeds, self.share = out, units, grid, seeds, share
        self.claims_dir = out / CLAIMS
        self.results: dict[Run, dict] = {}
        self.claims: dict[Run, int] = {}  # run -> the descriptor of its claim file, locked

    def first_runs(self) -> list[Run]:
        return [Run(m, lr, self.seeds[0], v) for m, v in self.units for lr in self.grid]

    def chosen(self) -> dict[tuple[str, Variant], float]:
        """Each unit's rate: the grid's one, or the best on validation once all its grid runs are done."""
        rates = {}
        for model, variant in self.units:
            errors = {lr: self.results.get(Run(model, lr, self.seeds[0], variant)) for lr in self.grid}
            if len(self.grid) == 1:
                rates[(model, variant)] = self.grid[0]
            elif all(errors.values()):
                rates[(model, variant)] = min(self.grid, key=lambda lr: _selection_error(errors[lr]))
        return rates

    def planned(self) -> list[tuple[int, Run]]:
        """(position in the plan, run) of every run whose rate is known: the grid's, then the other seeds'."""
        first = self.first_runs()
        chosen = self.chosen()
        later = [Run(m, chosen.get((m, v)), s, v) for (m, v) in self.units for s in self.seeds[1:]]
        return [(i, run) for i, run in enumerate(first + later) if run.lr is not None]

    def complete(self) -> bool:
        self.collect([run for _, run in self.planned()])
        return len(self.chosen()) == len(self.units) and all(run in self.results for _, run in self.planned())

    def collect(self, runs: list[Run]):
        """Add the results that other processes (or earlier calls) wrote for ``runs``."""
        for run in runs:
            done = run.folder(self.out) / RESULT_NAME
            if run not in self.results and done.is_file():
                self.results[run] = json.loads(done.read_text())

    def take(self) -> Run | None:
        """Claim the next run to train: this share's first, then those of shares that left; None
        when there is none now, and then, with no run of this process still running, leave."""
        with self._folder_lock():
            self.collect(self.first_runs())
            planned = self.planned()
            self.collect([run for _, run in planned])
            left = {int(p.name.split("-")[1]) for p in self.claims_dir.glob(f"left-*-of-{self.share.count}")}
            mine = [run for i, run in planned if self.share.owner(i) == self.share.index]
            theirs = [run for i, run in planned if self.share.owner(i) in left - {self.share.index}]
            for run in mine + theirs:
                if run not in self.results and run not in self.claims and self._claim(run):
                    return run
            if not self.claims:
                (self.claims_dir / f"left-{self.share.index}-of-{self.share.count}").touch()
            return None

    def release(self, run: Run):
        os.close(self.claims.pop(run))

    def close(self):
        for run in list(self.claims):
            self.release(run)

    def _claim(self, run: Run) -> bool:
        name = "--".join(run.folder(self.out).relative_to(self.out).parts) + ".lock"
        fd = os.open(self.claims_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process trains it
            os.close(fd)
            return False
        self.claims[run] = fd
        return True

    @contextlib.contextmanager
    def _folder_lock(self):
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.claims_dir / "folder.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a scan of the folder: milliseconds
            yield
        finally:
            os.close(fd)


def _selection_error(result: dict) -> float:
    error = result["val_error"] if result["val_error"] is not None else result["test_error"]
    return math.inf if error is None or math.isnan(error) else error
