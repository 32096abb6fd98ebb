"""How many runs of an ablation train at once, and on which device."""

from __future__ import annotations

import os

import torch

# Runs at once on each GPU by default: 4 runs at once each trained at a single run's speed on one
# H200 (2026-12-04); a step is bound by kernel launches, not by the GPU's arithmetic.
RUNS_PER_GPU = 4
# Runs at once at most: each is a process with its own data and model, whatever the machine
MAX_JOBS = 256


def check_jobs(jobs: int | None, device: str) -> str | None:
    """--jobs checked -> a warning where it is above what this machine runs at once (a core per run,
    or RUNS_PER_GPU per GPU), else None: such runs share them, and take longer each."""
    if jobs is None:
        return None
    if not 1 <= jobs <= MAX_JOBS:
        raise ValueError(f"--jobs {jobs} is not allowed; --jobs takes 1 to {MAX_JOBS} (leave it out for "
                         f"{RUNS_PER_GPU} runs per GPU, or 1 on the CPU)")
    most = max(os.cpu_count() or 1, default_jobs(device))
    if jobs <= most:
        return None
    return (f"--jobs {jobs} is more than this machine runs at once ({most}: a run per CPU core, or {RUNS_PER_GPU} "
            "per GPU): the runs share them, each slower; going on")


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
