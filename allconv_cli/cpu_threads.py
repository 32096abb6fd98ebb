"""How many threads the CPU path runs: one per core that is free when the work starts (and, in
training, as it goes on), or what ``--threads`` says.

torch starts one OpenMP thread per core it may run on, whatever else runs there. Every
convolution ends at a barrier where all its threads meet, so when another process holds a core,
each step waits on the thread that shares that core with it, and the whole step runs at the
busy core's pace (docs/speed.md has the measurements). Starting as many threads as there are
cores that others leave idle keeps another process from costing more than its share.

The thread count changes the rounding of a convolution's sums (1 and 2 threads give weights that
differ in the last bits after one step), so a run that must repeat bit for bit gives the count:
``--threads``, OMP_NUM_THREADS, or ``--deterministic`` (one per core, torch's own count).
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from allconv_cli.util import plural

RECHECK_SECONDS = 10.0  # between a run's re-checks of the free cores: a load that comes or goes costs at most this
SAMPLE_SECONDS = 0.25  # how long the idle time of the cores is watched before the choice: 25 jiffies at 100 Hz
BUSY_MARGIN = 0.25  # of a core: what others may use of a core that still counts as free (a shell, a monitor)


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """The threads the CPU path runs, and what they were chosen from."""

    threads: int
    cores: int  # the cores this process may run on
    free: float | None  # of them, the cores that others left idle while sampled; None: not measured
    given_by: str | None  # what fixed the count: --threads, OMP_NUM_THREADS, --deterministic; None: the load

    def describe(self) -> str:
        """'1 CPU thread (1.0 of 2 cores free)'; '4 CPU threads (--threads)'."""
        count = plural(self.threads, "CPU thread")
        if self.given_by is not None:
            return f"{count} ({self.given_by})"
        if self.free is None:
            return f"{count} ({self.cores} cores; their load is unknown here)"
        return f"{count} ({self.free:.1f} of {self.cores} cores free)"

    def record(self) -> dict:
        """For a run's environment record (config.json) and a benchmark's result."""
        return dataclasses.asdict(self)


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _busy_seconds(cores: list[int]) -> float | None:
    """Seconds ``cores`` have been busy since boot (all but idle and I/O wait; time the hypervisor
    gave to other machines counts as busy), from Linux's /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3] != " "]
    except OSError:
        return None
    wanted = {f"cpu{core}" for core in cores}
    busy = 0
    for fields in lines:
        if fields[0] in wanted:
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class OthersUse:
    """The cores that other processes keep busy among ``cores``, on average since this was made:
    their busy time in /proc/stat (Linux) less this process's own CPU time."""

    def __init__(self, cores: list[int]):
        self.cores = cores
        self.busy, self.own, self.since = _busy_seconds(cores), time.process_time(), time.monotonic()

    def cores_used(self) -> float | None:
        """Cores of ``cores`` others used since this was made; None where /proc/stat is missing."""
        busy, elapsed = _busy_seconds(self.cores), time.monotonic() - self.since
        if busy is None or self.busy is None or elapsed <= 0:
            return None
        others = busy - self.busy - (time.process_time() - self.own)
        return min(float(len(self.cores)), max(0.0, others / elapsed))


def free_cores(cores: list[int], seconds: float = SAMPLE_SECONDS) -> float | None:
    """Cores of ``cores`` that other processes leave idle over ``seconds`` of watching them (this
    process's own CPU time not counted as theirs); from the load average where /proc/stat is
    missing (other Unixes); None where neither is known (Windows)."""
    watch = OthersUse(cores)
    if watch.busy is None:
        if not hasattr(os, "getloadavg"):
            return None
        return max(0.0, len(cores) - os.getloadavg()[0])
    time.sleep(seconds)
    return len(cores) - watch.cores_used()


def pick_threads(free: float | None, cores: int) -> int:
    """The thread count for ``free`` idle cores of ``cores``: one per free core, a core others
    use less than ``BUSY_MARGIN`` of counting as free; at least one; all ``cores`` where the
    load is unknown (torch's own choice)."""
    if free is None:
        return cores
    return max(1, min(cores, int(free + BUSY_MARGIN)))


def choose_threads(threads: int | None = None, processes: int = 1, fixed: bool = False) -> ThreadChoice:
    """``threads`` where given (``--threads``), else OMP_NUM_THREADS where the environment sets
    it, else one per free core; ``fixed`` (a run that must compute bit for bit alike whatever the
    load: ``--deterministic``) takes one per core instead, torch's own count. Free cores and
    cores are shared among ``processes`` of this run on the machine (torchrun's, on the CPU)."""
    cores = usable_cores()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be 1 or more, got {threads}")
        return ThreadChoice(threads, len(cores), None, "--threads")
    from_environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_environment.isdigit() and int(from_environment) > 0:
        return ThreadChoice(int(from_environment), len(cores), None, "OMP_NUM_THREADS")
    if fixed:
        return ThreadChoice(max(1, len(cores) // processes), len(cores), None, "--deterministic")
    free = free_cores(cores)
    return ThreadChoice(max(1, pick_threads(free, len(cores)) // processes), len(cores), free, None)


def use_threads(threads: int | None = None, processes: int = 1, fixed: bool = False) -> ThreadChoice:
    """Choose the thread count (``choose_threads``) and set torch's intra-op threads to it. The
    inter-op pool is left as it is: an eager step never hands work to it."""
    choice = choose_threads(threads, processes, fixed)
    torch.set_num_threads(choice.threads)
    return choice


class ThreadWatch:
    """Re-checks the free cores as a run goes, from what others used since the last check (no
    pause), and sets torch's threads to match, so that a load that starts or ends mid-run is
    followed within ``RECHECK_SECONDS``. Does nothing to a count that was given (``--threads``,
    OMP_NUM_THREADS, ``--deterministic``) or where the load is unknown."""

    def __init__(self, choice: ThreadChoice, processes: int = 1):
        self.choice, self.processes = choice, processes
        self.following = choice.given_by is None and choice.free is not None
        self.watch = OthersUse(usable_cores())

    def check(self) -> ThreadChoice:
        """Called often (the loop's host syncs); looks again once ``RECHECK_SECONDS`` have passed."""
        if not self.following or time.monotonic() - self.watch.since < RECHECK_SECONDS:
            return self.choice
        others = self.watch.cores_used()
        self.watch = OthersUse(self.watch.cores)
        if others is None:
            return self.choice
        free = self.choice.cores - others
        threads = max(1, pick_threads(free, self.choice.cores) // self.processes)
        if threads != self.choice.threads:
            torch.set_num_threads(threads)
        self.choice = dataclasses.replace(self.choice, threads=threads, free=free)
        return self.choice
