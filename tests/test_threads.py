"""The CPU thread choice: what it picks for a given number of free cores, what wins over it, how a
run follows the load, and where the choice is shown. Nothing here measures a speed."""

import json

import pytest
import torch
from typer.testing import CliRunner

from allconv_cli import benchmark, cpu_threads
from allconv_cli.cli import app
from allconv_cli.cpu_threads import ThreadChoice, ThreadWatch, choose_threads, pick_threads

runner = CliRunner()


@pytest.fixture(autouse=True)
def machine(monkeypatch):
    """Four cores, no OMP_NUM_THREADS (the suite sets it), torch's thread count restored after."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: [0, 1, 2, 3])
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def free(count):
    return lambda cores, seconds=cpu_threads.SAMPLE_SECONDS: count


@pytest.mark.parametrize("free_cores, threads", [
    (4.0, 4),  # idle: every core, as torch's own choice
    (3.9, 4), (3.8, 4),  # a shell or a monitor takes less than a quarter of a core: still free
    (3.0, 3),  # one busy process
    (2.6, 2),  # part of a core busy: not free
    (1.0, 1), (0.3, 1), (0.0, 1),  # every core busy: one thread, never none
    (None, 4),  # load unknown (no /proc/stat, no load average): torch's own choice
])
def test_one_thread_per_free_core(free_cores, threads):
    assert pick_threads(free_cores, 4) == threads


@pytest.mark.parametrize("free_cores, processes, threads", [(4.0, 1, 4), (3.0, 1, 3), (4.0, 2, 2), (1.0, 2, 1)])
def test_the_choice_from_the_sampled_load(monkeypatch, free_cores, processes, threads):
    monkeypatch.setattr(cpu_threads, "free_cores", free(free_cores))
    choice = choose_threads(None, processes)
    assert (choice.threads, choice.cores, choice.free, choice.given_by) == (threads, 4, free_cores, None)
    assert choice.describe() == f"{threads} CPU thread{'s' if threads > 1 else ''} ({free_cores:.1f} of 4 cores free)"


def test_threads_wins_then_the_environment_then_deterministic(monkeypatch):
    monkeypatch.setattr(cpu_threads, "free_cores", free(1.0))
    assert choose_threads(3).threads == 3 and choose_threads(3).given_by == "--threads"
    assert choose_threads(8).threads == 8  # more than the cores: what was asked
    assert choose_threads(None, fixed=True) == ThreadChoice(4, 4, None, "--deterministic")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(None, fixed=True) == ThreadChoice(2, 4, None, "OMP_NUM_THREADS")
    assert choose_threads(3).threads == 3
    with pytest.raises(ValueError, match="--threads must be 1 or more, got 0"):
        choose_threads(0)


def test_free_cores_leave_out_this_process_own_work():
    cores = cpu_threads.usable_cores()
    watch = cpu_threads.OthersUse(cores)
    end = cpu_threads.time.process_time() + 0.2
    while cpu_threads.time.process_time() < end:  # 0.2 s of this process's own CPU time
        pass
    used = watch.cores_used()
    assert used is None or 0 <= used <= len(cores)


class FakeUse:
    """Others kept ``USED`` cores busy since it was made."""

    USED = 0.0

    def __init__(self, cores):
        self.cores, self.since = cores, -1e9  # made long ago: a re-check is due

    def cores_used(self):
        return FakeUse.USED


def test_a_run_follows_the_load_as_it_comes_and_goes(monkeypatch):
    monkeypatch.setattr(cpu_threads, "OthersUse", FakeUse)
    watch = ThreadWatch(ThreadChoice(4, 4, 4.0, None))
    FakeUse.USED = 2.0  # two busy processes start
    assert watch.check().threads == 2 and torch.get_num_threads() == 2
    FakeUse.USED = 0.1  # they end
    assert watch.check().threads == 4 and torch.get_num_threads() == 4
    given = ThreadWatch(ThreadChoice(3, 4, None, "--threads"))
    FakeUse.USED = 3.0
    assert given.check().threads == 3 and torch.get_num_threads() == 4  # a given count is kept


def test_benchmark_threads_option_and_its_load_report(monkeypatch):
    monkeypatch.setitem(benchmark.MATMUL_SIZE, "cpu", 256)
    tiny = ["benchmark", "--mode", "data", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--device", "cpu"]
    result = runner.invoke(app, [*tiny, "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["threads"] == 1 and out["thread_choice"]["given_by"] == "--threads"
    assert out["busy_cores"] is None or out["machine_idle"] == (out["busy_cores"] < cpu_threads.BUSY_MARGIN)
    monkeypatch.setattr(cpu_threads, "free_cores", free(1.0))
    monkeypatch.setattr(benchmark, "busy_cores", lambda *args: 3.0)
    result = runner.invoke(app, tiny)
    assert result.exit_code == 0, result.output
    assert "1 threads" in result.output  # the title: one free core of four, one thread
    assert "Warning: other processes kept up to 3.0 of 4 cores busy" in result.output
    result = runner.invoke(app, [*tiny, "--threads", "0"])
    assert result.exit_code == 2 and result.output.strip() == "Error: --threads must be 1 or more, got 0"


def test_a_run_shows_and_records_its_threads(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--preset", "smoke", "--train-limit", "32", "--test-limit", "16",
                                 "--batch-size", "16", "--out", str(run), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "1 CPU thread (--threads)" in result.output.splitlines()[0]
    saved = json.loads((run / "config.json").read_text())
    assert saved["environment"]["cpu_threads"] == {"threads": 1, "cores": 4, "free": None, "given_by": "--threads"}


def test_contention_report_judges_each_share_against_its_target(monkeypatch):
    """benchmarks/bench_contention.py on made-up speeds: its table and its verdicts, no timing."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_contention as script

    speeds = {"default": (200, 150, 90), "faithful": (200, 130, 90), "paper-cifar10": (200, 190, 50),
              script.BASELINE: (100, 60, 40)}  # shares beside 1 and 2: 75/45, 65/45, 95/25 against 60/40
    results = {(side, load): {"images_per_s": speed, "threads": 2 - bool(load), "busy_cores": float(load),
                              "precision": "bf16"}
               for side, row in speeds.items() for load, speed in enumerate(row)}
    assert [script.met(results, side, [0, 1, 2]) for side in speeds if side != script.BASELINE] == [
        "yes", "no: beside 1", "no: beside 2"]
    table = script.report(results, script.parse_args([]), "python benchmarks/bench_contention.py", "2026-01-01")
    assert "| allconv default (bf16) | 2/1/1 | 200 | 150 (75 %) | 90 (45 %) | yes |" in table
    assert "| plain PyTorch | 2/1/1 | 100 | 60 (60 %) | 40 (40 %) |  |" in table
    assert "Warning" not in table  # others kept no core busy while the idle speeds were measured
    results["faithful", 0]["busy_cores"] = 1.0
    assert "Warning: other processes kept 1.0 cores busy during the idle measurements" in script.report(
        results, script.parse_args([]), "python benchmarks/bench_contention.py", "2026-01-01")
