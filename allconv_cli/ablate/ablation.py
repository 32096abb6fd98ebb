"""An ablation from its plan to its table: every combination checked, the runs trained (by
however many processes share the folder), the table written by the one that finishes last."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from allconv_cli.ablate.grid import PLAN_NAME, prepare, variants
from allconv_cli.ablate.paper import table_rows
from allconv_cli.ablate.pool import execute
from allconv_cli.ablate.shards import Queue, Share
from allconv_cli.ablate.tables import write_tables
from allconv_cli.train.config import TrainConfig
from allconv_cli.util import atomic_write_text


def ablate(base: TrainConfig, models: list[str], grid: list[float], seeds: list[int], out: str | Path,
           jobs: int | None = None, progress: Callable[..., None] | None = None,
           settings_grid: dict[str, list] | None = None, share: Share = Share(),
           warn: Callable[[str], None] | None = None, networks: dict[str, dict] | None = None) -> list[dict] | None:
    """Run (or continue) the ablation in ``out``, ``jobs`` runs at once (None: ``slots.default_jobs``),
    each model under each combination of ``settings_grid`` -> one row per model and combination
    (see ``paper.table_rows``), or None where runs of other shares are not finished yet. ``warn``
    gets the line of a --jobs above what the machine runs at once."""
    out = Path(out)
    progress = progress or (lambda event, **fields: None)
    prepared = prepare(base, models, grid, seeds, out, jobs, settings_grid, networks)
    if prepared["warning"] and warn is not None:
        warn(prepared["warning"])
    out.mkdir(parents=True, exist_ok=True)
    previous = out / PLAN_NAME
    if not previous.is_file():
        atomic_write_text(previous, json.dumps(prepared["plan"], indent=2))
    units = [(m, v) for m in models for v in variants(settings_grid or {})]
    queue = Queue(out, units, grid, seeds, share)
    _skipped(queue, progress)
    left = len(units) * (len(grid) + len(seeds) - 1) - len(queue.results)  # a worker for each run at most
    try:
        execute(base, queue.take, queue.release, out, max(1, min(prepared["jobs"], left)), queue.results, progress,
                share.time_left, networks)
    finally:
        queue.close()
    if not queue.complete():
        return None  # runs of another share are not finished: the last process to finish writes the table
    rows = table_rows(units, queue.chosen(), seeds, queue.results, base, networks)
    write_tables(rows, out)
    return rows


def _skipped(queue: Queue, progress):
    """Report the runs finished by an earlier call or another process."""
    queue.collect(queue.first_runs())
    planned = [run for _, run in queue.planned()]  # the later seeds' too, once the grid's results are read
    queue.collect(planned)
    for run in planned:
        if run in queue.results:
            progress("skip", run=run, result=queue.results[run])
