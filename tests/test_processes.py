"""No process outlives its command (issues #47, #48): an ablation's workers end with it whatever
ends it, each stopped run keeps a resumable checkpoint, the exceptions that cross from a worker
to its parent survive pickling, and a device this machine lacks is one line before any work."""

import importlib
import inspect
import json
import os
import pickle
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import allconv_cli
from allconv_cli import ablate
from allconv_cli.ablate import pool
from allconv_cli.cli import app
from allconv_cli.device import available_devices
from allconv_cli.processes import WorkerPool, catch_signals

ALLCONV = str(Path(sys.executable).parent / "allconv")
MODELS = ("all-cnn-c", "model-c")


# --- exceptions that cross a process boundary --------------------------------------------------

def our_exceptions() -> set[type]:
    """Every exception class defined in the package, found by importing each of its modules."""
    found = set()
    for module in pkgutil.walk_packages(allconv_cli.__path__, "allconv_cli."):
        if module.name.endswith("__main__"):
            continue
        for _, value in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(value, BaseException) and value.__module__.startswith("allconv_cli"):
                found.add(value)
    return found


def examples() -> list[BaseException]:
    from allconv_cli.explain.targets import _StopForward
    from allconv_cli.export import VerificationError
    from allconv_cli.models.initialization import _Reached
    from allconv_cli.train.loop import ClassReluShut, TrainingDiverged, TrainingStopped

    return [TrainingStopped(signal.SIGTERM, Path("runs/a")), TrainingDiverged("the loss became nan"),
            ClassReluShut("the ReLU after the class conv was shut"),
            VerificationError("max |diff| 0.1 over tolerance 0.01"), _StopForward(), _Reached()]


def test_every_exception_of_ours_survives_pickling():
    made = examples()
    assert {type(e) for e in made} == our_exceptions(), "give each new exception class an example here"
    for error in made:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.args == error.args
        assert vars(copy) == vars(error)
    stopped = pickle.loads(pickle.dumps(made[0]))
    assert stopped.signum == signal.SIGTERM and "stopped by SIGTERM; resume with: allconv train --resume runs/a" == str(stopped)


def echo(value):
    return value


def fail(message):
    raise ValueError(message)


def test_a_pool_returns_results_and_errors_and_leaves_no_worker():
    with WorkerPool(echo, (None,)) as pool:
        assert pool.submit(echo, {"a": 1}).result(timeout=120) == {"a": 1}
        error = pool.submit(fail, "bad input").exception(timeout=60)
        assert type(error) is ValueError and str(error) == "bad input"
        assert "in a worker process" in error.__notes__[0]  # the worker's traceback travels with it
        assert pool.submit(echo, 2).result(timeout=60) == 2  # the worker that raised is reused
        workers = list(pool._processes)
    assert len(workers) == 1 and workers[0].exitcode == 0


def test_signals_inside_a_catcher_are_recorded_and_a_second_one_kills():
    forwarded = []
    with catch_signals(forward=forwarded.append) as caught:
        os.kill(os.getpid(), signal.SIGHUP)
        with catch_signals() as inner:  # train() inside a worker or an ablation: the same list
            assert inner is caught
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert caught == [signal.SIGHUP] and forwarded == [signal.SIGHUP]
    with catch_signals(escalate=False) as caught:  # a worker's: repeats ask for the same stop
        for s in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), s)
    assert caught == [signal.SIGINT, signal.SIGINT, signal.SIGTERM]


def test_a_stop_starts_no_other_task_and_waits_for_the_running_ones():
    """run_in_slots with ``start`` returning None, as an ablation's after a signal or a failure."""
    from concurrent.futures import ThreadPoolExecutor

    started = []
    with ThreadPoolExecutor(2) as threads:
        def start(task, slot):
            if task == "c":
                return None
            started.append(task)
            return threads.submit(time.sleep, 0.2 if task == "a" else 0.01)

        ended = [task for task, _ in ablate.run_in_slots(["a", "b", "c", "d", "e"], ["s0", "s1"], start)]
    assert started == ["a", "b"] and ended == ["b", "a"]  # "a" still ran to its end; "d", "e" never started


# --- an ablation with two jobs, signalled each way ---------------------------------------------

def processes_of(pid: int) -> list[str]:
    """``ps`` lines of the processes in ``pid``'s group or whose parent is ``pid``."""
    lines = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True).stdout
    return [line for line in lines.splitlines() if pid in (int(line.split()[1]), int(line.split()[2]))
            and int(line.split()[0]) != pid]


def epochs_done(out: Path) -> list[int]:
    counts = []
    for model in MODELS:
        metrics = out / model / "lr0.05-seed0" / "metrics.jsonl"
        counts.append(len(metrics.read_text().splitlines()) if metrics.exists() else 0)
    return counts


def signalled(args: list[str], out: Path, signum: int, to_group: bool) -> tuple[int, str, float]:
    """Start the ablation in its own process group, wait until both runs have trained an epoch in
    it (two workers at work), send ``signum`` -> (exit code, stderr, when it was sent)."""
    before = epochs_done(out)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not all(n > b for n, b in zip(epochs_done(out), before)) and proc.poll() is None:
            assert time.time() < deadline, "the runs did not start"
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        workers = [line for line in processes_of(proc.pid) if "spawn_main" in line]
        assert len(workers) == 2, workers
        sent = time.time()
        os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:  # a failed check leaves no ablation running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 10
    while processes_of(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_of(proc.pid), processes_of(proc.pid)
    return proc.returncode, stderr, sent


@pytest.mark.slow
def test_an_ablation_with_two_jobs_ends_whatever_ends_it_and_continues(tmp_path):
    out = tmp_path / "ablation"
    args = [ALLCONV, "ablate", "--models", ",".join(MODELS), "--preset", "smoke", "--train-limit", "32",
            "--test-limit", "16", "--batch-size", "16", "--epochs", "20", "--jobs", "2", "--out", str(out)]
    line = f"interrupted; run the same command again to continue {out}\n"
    # SIGHUP takes SIGTERM's path (catch_signals, tested above) to its own exit code, 129
    for signum, to_group, code in ((signal.SIGTERM, False, 143), (signal.SIGINT, True, 130),
                                   (signal.SIGKILL, False, -9)):
        returncode, stderr, sent = signalled(args, out, signum, to_group)
        assert returncode == code, stderr
        if signum != signal.SIGKILL:
            assert stderr == line
        for model in MODELS:  # a checkpoint written at the stop; SIGKILL: by the orphaned workers
            state = out / model / "lr0.05-seed0" / "state.pt"
            assert state.stat().st_mtime >= sent - 0.1, (signum, model)
    done = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["model"] for r in rows] == list(MODELS) and all(0 <= r["test_error_mean"] <= 100 for r in rows)
    assert epochs_done(out) == [20, 20]  # each run continued from its checkpoints to the end


STREAMED_TRAINING = """
import sys
from allconv_cli.cli import app
from allconv_cli.data import folders
folders.IN_MEMORY_LIMIT = 0  # every image folder streams through DataLoader workers
sys.argv = ["allconv", "train", "--preset", "smoke", "--dataset", "imagefolder", "--data-dir", sys.argv[1],
            "--workers", "2", "--epochs", "100", "--batch-size", "8", "--device", "cpu", "--out", sys.argv[2]]
app()
"""


@pytest.mark.slow
def test_dataloader_workers_leave_the_stop_to_their_trainer(tmp_path):
    """SIGTERM to the whole group, as a service manager sends it: the DataLoader workers ignore
    it and are ended by the run, which stops at a checkpoint (they used to die and fail it)."""
    from PIL import Image

    for split in ("train", "test"):
        for i in range(32):
            (tmp_path / "data" / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (8 * i, 0, 0)).save(tmp_path / "data" / split / f"c{i % 2}" / f"{i}.png")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-P", "-c", STREAMED_TRAINING, str(tmp_path / "data"), str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        # past its first epoch, while its two DataLoader workers feed it
        while not ((run / "metrics.jsonl").exists() and len(processes_of(proc.pid)) == 2) and proc.poll() is None:
            assert time.time() < deadline, "the run did not start"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and stderr.endswith(f"\nstopped by SIGTERM; resume with: allconv train --resume {run}\n"), stderr
    assert (run / "state.pt").exists() and not processes_of(proc.pid)


# --- devices this machine does not have --------------------------------------------------------

ODD_DEVICES = ["mps", "xpu", "xpu:1", "meta", "cuda", "cuda:1", "cpu:1", "garbage", "", "CUDA", "hpu", "cuda:-1"]


@pytest.mark.parametrize("device", ODD_DEVICES)
def test_an_odd_device_is_one_line_and_exit_2(tmp_path, device):
    if device in available_devices() or (device == "cuda" and "cuda:0" in available_devices()):
        pytest.skip(f"this machine has {device}")
    result = CliRunner().invoke(app, ["train", "--preset", "smoke", "--device", device, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert f"this machine has: {', '.join(available_devices())}" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [
    ["eval", str(Path(allconv_cli.__file__).parent / "assets" / "all-cnn-c-cifar10.safetensors"), "--out"],
    ["benchmark", "--preset", "smoke", "--steps", "1", "--warmup", "0", "--json"],
    ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--out"],
    ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--dry-run", "--out"],
], ids=["eval", "benchmark", "ablate", "ablate --dry-run"])
def test_every_command_checks_its_device_first(tmp_path, command):
    if command[-1] == "--out":
        command = [*command, str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*command, "--device", "meta"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("Error: device 'meta' holds no data")
    assert not (tmp_path / "out").exists()


def test_the_ablation_checks_the_device_before_it_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "train_one", lambda *args: pytest.fail("a run started"))
    from allconv_cli.train.settings import resolve

    with pytest.raises(ValueError, match="device 'meta' holds no data"):
        ablate.ablate(resolve("smoke", device="meta"), ["all-cnn-c"], [0.05], [0], tmp_path / "a", jobs=2)
    assert not (tmp_path / "a").exists()
