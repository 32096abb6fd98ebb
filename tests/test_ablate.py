"""allconv ablate: the table files, resumption after a kill, the learning-rate choice."""

import dataclasses
import itertools
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from allconv_cli import ablate
from allconv_cli.ablate import pool
from allconv_cli.cli import app
from allconv_cli.models.registry import CIFAR10_CLASSES

ALLCONV = str(Path(sys.executable).parent / "allconv")
TINY = ["--preset", "smoke", "--train-limit", "32", "--test-limit", "16", "--batch-size", "16"]


@pytest.mark.slow
def test_two_models_two_seeds_survive_a_kill(tmp_path):
    out = tmp_path / "ablation"
    args = [ALLCONV, "ablate", "--models", "all-cnn-c,model-c", "--seeds", "2", *TINY, "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "all-cnn-c" / "lr0.05-seed0" / "result.json"
    deadline = time.time() + 180
    while not first.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (out / "table.md").exists()
    kept = first.read_text(), first.stat().st_mtime_ns
    # Continue with two parallel jobs (spawned worker processes).
    done = subprocess.run([*args, "--jobs", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (first.read_text(), first.stat().st_mtime_ns) == kept  # the finished run was not redone
    rows = json.loads(done.stdout[done.stdout.index("["):])
    assert [r["model"] for r in rows] == ["all-cnn-c", "model-c"]
    assert all(r["seeds"] == 2 and 0 <= r["test_error_mean"] <= 100 for r in rows)
    assert rows[0]["params"] == 1_369_738 and rows[0]["paper_params"] == "~1.4 M"
    for name in ("table.md", "table.csv", "table.json", "chart.png"):
        assert (out / name).stat().st_size > 0
    assert "| all-cnn-c (BatchNorm) | 1,369,738 |" in (out / "table.md").read_text()  # the network as built
    assert (out / "table.csv").read_text().splitlines()[0].startswith("model,params,paper_params,lr")


def test_rate_is_picked_on_validation_not_test(tmp_path, monkeypatch):
    """With a grid, each model's rate is the one with the lowest validation error."""
    def fake_train_one(config_json, folder, device, time_limit=None):
        config = json.loads(config_json)
        # validation favours 0.01, test would favour 0.1
        result = {"model": config["model"], "lr": config["lr"], "seed": config["seed"], "seconds": 0,
                  "epochs": 1, "val_error": 10 if config["lr"] == 0.01 else 20,
                  "test_error": 30 if config["lr"] == 0.01 else 5}
        Path(folder).mkdir(parents=True)
        (Path(folder) / ablate.RESULT_NAME).write_text(json.dumps(result))
        return result

    monkeypatch.setattr(pool, "train_one", fake_train_one)
    from allconv_cli.train.settings import resolve

    base = resolve("smoke", val_fraction=0.1)
    rows = ablate.ablate(base, ["all-cnn-c"], [0.1, 0.01], [0, 1, 2], tmp_path)
    assert rows[0]["lr"] == 0.01 and rows[0]["seeds"] == 3 and rows[0]["test_error_mean"] == 30
    # grid with the first seed, then seeds 1 and 2 at the chosen rate only
    assert sorted(p.name for p in (tmp_path / "all-cnn-c").iterdir()) == [
        "lr0.01-seed0", "lr0.01-seed1", "lr0.01-seed2", "lr0.1-seed0"]


def fake_speed(monkeypatch, images_per_s=100.0):
    """benchmark.run as the dry run calls it, at a fixed speed (a training step is 3 forwards)."""
    def run(config, mode, **kwargs):
        return {"device": "cpu", "device_name": "test CPU", "precision": "fp32",
                "gflop_per_image": {"forward": 1.0, "train": 3.0},
                "results": {mode: {"images_per_s": images_per_s}}}

    monkeypatch.setattr("allconv_cli.benchmark.run", run)


def test_selection_and_dry_run(monkeypatch):
    fake_speed(monkeypatch)
    assert ablate.select_models("c") == ["model-c", "strided-cnn-c", "convpool-cnn-c", "all-cnn-c"]
    assert ablate.select_models(patterns=["all-cnn-*"])[-2:] == ["all-cnn-imagenet", "all-cnn-c-bn"]
    table3 = ablate.select_models(patterns=["all"])
    assert len(table3) == 12 and table3[:2] == ["model-a", "strided-cnn-a"] and "all-cnn-imagenet" not in table3
    with pytest.raises(ValueError, match="did you mean"):
        ablate.select_models(patterns=["all-cnn-x"])
    result = CliRunner().invoke(app, ["ablate", "--family", "c", "--lr-grid", "paper", "--seeds", "3",
                                      "--preset", "smoke", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    # smoke: 256 training images less the 10 % validation split, 1 epoch, 128 test images
    assert plan["images"] == {"train": 230, "evaluated": 154, "test": 128}
    # one step timed (model-c's, at 100 img/s); the other networks' speeds scaled by their FLOPs; per run
    # 230 images trained and 154 evaluated (a forward pass's share of a step's FLOPs); 6 runs of each model
    from allconv_cli.ablate.estimate import conv_flops
    from allconv_cli.train.settings import resolve

    flops = {m: conv_flops(resolve("smoke", model=m)) for m in ablate.select_models("c")}
    speeds = {m: 100 * flops["model-c"]["train"] / f["train"] for m, f in flops.items()}
    expected = sum(6 * (230 / speeds[m] + 154 * f["forward"] / f["train"] / speeds[m]) for m, f in flops.items())
    assert plan["estimate"]["seconds"] == pytest.approx(expected)
    assert plan["estimate"]["per_model"]["model-c"]["images_per_s"] == 100
    assert speeds["all-cnn-c"] != 100 and plan["estimate"]["measured"].startswith("1 training step after")
    # 4 models x 4 rates with seed 0, then 2 more seeds each at the chosen rate
    assert plan["runs"] == len(plan["plan"]) == 24
    assert plan["plan"][15] == {"model": "all-cnn-c", "lr": 0.01, "seed": 0}
    assert plan["plan"][16] == {"model": "model-c", "lr": "chosen", "seed": 1}


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    from allconv_cli.train.settings import resolve

    (tmp_path / ablate.PLAN_NAME).write_text(json.dumps({"config": {}, "models": [], "grid": [], "seeds": []}))
    with pytest.raises(ValueError, match="other settings"):
        ablate.ablate(resolve("smoke"), ["all-cnn-c"], [0.05], [0], tmp_path)


def test_dry_run_reads_no_data(tmp_path, monkeypatch):
    """CIFAR-10 without its pickles: counted from its known size, timed by a real training step."""
    result = CliRunner().invoke(app, ["ablate", "--models", "model-a", "--dataset", "cifar10", "--data-dir",
                                      str(tmp_path / "nothing-here"), "--epochs", "2", "--batch-size", "4",
                                      "--device", "cpu", "--precision", "fp32", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["images"] == {"train": 50_000, "evaluated": 20_000, "test": 10_000}
    assert plan["training_images"] == 100_000
    speed = plan["estimate"]["per_model"]["model-a"]["images_per_s"]
    assert speed > 0 and plan["estimate"]["seconds"] > 100_000 / speed
    assert not (tmp_path / "nothing-here").exists()


def test_dry_run_counts_an_image_folder_without_decoding(tmp_path, monkeypatch):
    fake_speed(monkeypatch)
    for split, count in (("train", 7), ("val", 3)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                (tmp_path / split / cls / f"{i}.jpg").write_bytes(b"not decoded")  # would fail to load
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(app, ["ablate", "--models", "all-cnn-c", "--dataset", "imagefolder",
                                      "--data-dir", str(tmp_path), "--epochs", "3", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "1. all-cnn-c  lr 0.2  seed 0  3 epochs x 14 images" in result.stdout
    assert "estimated time: 0 s on test CPU" in result.stdout


def test_known_sizes_are_the_bundled_samples():
    from allconv_cli.data.datasets import load_split

    assert ablate.SPLIT_IMAGES["sample"] == tuple(len(load_split("sample", s)) for s in ("train", "test"))


def fake_train_one(config_json, folder, device, time_limit=None):
    """A finished run whose test error is 12.5 % plus its seed (no training)."""
    config = json.loads(config_json)
    result = {"model": config["model"], "lr": config["lr"], "seed": config["seed"], "seconds": 0,
              "epochs": 1, "val_error": None, "test_error": 12.5 + config["seed"]}
    Path(folder).mkdir(parents=True)
    (Path(folder) / ablate.RESULT_NAME).write_text(json.dumps(result))
    return result


def test_table_piped_reads_as_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "train_one", fake_train_one)
    out = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 2)
    result = CliRunner().invoke(app, ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no progress lines when stderr is not a terminal
    # the bundled sample is not comparable with the paper: no paper column, and one seed no spread
    assert "| all-cnn-c (BatchNorm) | 1,369,738 | ~1.4 M | 0.05 | 12.50 (1 seed) |  |" in result.stdout.splitlines()
    assert f"tables and chart: {out}/table.md, table.csv, table.json, chart.png\n" in result.stdout


@pytest.mark.slow
def test_sigterm_stops_an_ablation_with_one_line(tmp_path):
    out = tmp_path / "ablation"
    args = [ALLCONV, "ablate", "--models", "all-cnn-c", "--preset", "smoke", "--train-limit", "256",
            "--epochs", "20", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = out / "all-cnn-c" / "lr0.05-seed0" / "metrics.jsonl"  # after the first epoch
    deadline = time.time() + 180
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "run the same command again" in stderr
    assert (out / "all-cnn-c" / "lr0.05-seed0" / "state.pt").exists()  # resumable


def test_table_3_column_beside_the_protocols_own(tmp_path, monkeypatch):
    """paper-cifar10-aug augments: Table 3's figure for every network, and Table 4's where it has one."""
    monkeypatch.setattr(pool, "train_one", fake_train_one)
    out = tmp_path / "fast"
    result = CliRunner().invoke(app, ["ablate", "--models", "model-a,all-cnn-c", "--preset", "paper-cifar10-aug",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == ("| network | params | paper's params | lr | test error % | paper, Table 3: 350 epochs, no "
                        "augmentation % | paper, with flips and translations % | difference from Table 3 |")
    assert lines[2].startswith("| model-a |") and lines[2].endswith("| 12.50 (1 seed) | 12.47 |  | +0.03 |")
    assert lines[3].endswith("| 12.50 (1 seed) | 9.08 | 7.25 | +3.42 |")
    assert "± 0.00" not in result.stdout
    rows = json.loads((out / "table.json").read_text())
    assert rows[0]["test_error_std"] is None and rows[1]["paper_protocol"] == "with flips and translations"
    assert (out / "chart.png").stat().st_size > 0


def test_seeds_give_a_spread_and_other_data_no_paper_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "train_one", fake_train_one)
    from allconv_cli.train.settings import resolve

    rows = ablate.ablate(resolve("paper-cifar10"), ["all-cnn-c"], [0.05], [0, 1], tmp_path / "two")
    assert rows[0]["test_error_std"] == pytest.approx(0.5 ** 0.5) and rows[0]["paper_table3"] == 9.08
    assert "| 13.00 ± 0.71 (2 seeds) | 9.08 | +3.92 |" in (tmp_path / "two" / "table.md").read_text()
    # an image folder: CIFAR-10's class names get the paper's figures, other classes none
    for classes, expected in ((CIFAR10_CLASSES, 9.08), (("zero", "one"), None)):
        root = tmp_path / classes[0]
        for name in classes:
            (root / "train" / name).mkdir(parents=True)
        base = dataclasses.replace(resolve("paper-cifar10"), dataset="imagefolder", data_dir=str(root))
        assert ablate.paper_key(base) == ("cifar10" if expected else None)
        rows = ablate.table_rows([("all-cnn-c", ())], {("all-cnn-c", ()): 0.05}, [0], {ablate.Run("all-cnn-c", 0.05, 0):
                                 {"test_error": 10.0}}, base)
        assert rows[0]["paper_table3"] == expected and rows[0]["paper_error"] == expected


@pytest.mark.slow
@pytest.mark.shared
def test_fast_protocol_runs_on_families_a_and_c(cifar10_test_folder, tmp_path):
    """fast-cifar10 (whitened first conv) trains model-a (5x5 first conv) and all-cnn-c (3x3) on
    real CIFAR-10 images: 20 per class to train on, 5 to test on, one epoch."""
    root = tmp_path / "cifar"
    for split, images in (("train", slice(0, 20)), ("test", slice(20, 25))):
        for folder in sorted((cifar10_test_folder / "test").iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[images]:
                (root / split / folder.name / image.name).write_bytes(image.read_bytes())
    result = CliRunner().invoke(app, ["ablate", "--models", "model-a,all-cnn-c", "--preset", "fast-cifar10",
                                      "--dataset", "imagefolder", "--data-dir", str(root), "--epochs", "1",
                                      "--batch-size", "32", "--device", "cpu",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "table.md").read_text()
    # the fast recipe's networks (BatchNorm, no dropout) are not the paper's: named as built, no paper column
    assert table.splitlines()[2].startswith("| model-a (BatchNorm, input dropout 0 %, dropout 0 %) |")
    assert "paper," not in table and "| 12.47 |" not in table and "± 0.00" not in table


# --- parallel runs: how many, and on which GPU --------------------------------------------------

@pytest.mark.parametrize("device, gpus, jobs", [
    ("auto", 0, 1), ("cpu", 2, 1), ("auto", 1, 4), ("auto", 2, 8), ("cuda", 3, 12), ("cuda:1", 2, 4)])
def test_default_jobs_are_four_runs_per_gpu_and_one_on_the_cpu(monkeypatch, device, gpus, jobs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert ablate.default_jobs(device) == jobs == (1 if device == "cpu" or not gpus else
                                                   ablate.RUNS_PER_GPU * (1 if ":" in device else gpus))


def test_slots_spread_over_every_gpu_or_keep_the_runs_own_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ablate.device_slots("auto", 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert ablate.device_slots("cuda:1", 3) == ablate.device_slots("cpu", 3) == [None] * 3


def test_the_jobs_help_states_the_runs_per_gpu():
    [jobs] = [o for o in typer.main.get_command(app).commands["ablate"].params if o.name == "jobs"]
    assert f"Default: {ablate.RUNS_PER_GPU} per GPU" in jobs.help


def test_zero_jobs_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--jobs", "0",
                                      "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--jobs 0 is not allowed" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a").exists()


def in_slots(durations: dict[str, float], slots: list[str]) -> tuple[dict, list, list]:
    """Run tasks that sleep ``durations`` (s) through ``run_in_slots`` on threads -> (the slot each
    task got, (slot, start, end) of each, the tasks in the order they were reported ended)."""
    placed, spans = {}, []

    def work(task, slot):
        started = time.monotonic()
        time.sleep(durations[task])
        spans.append((slot, started, time.monotonic()))

    with ThreadPoolExecutor(len(slots)) as pool:
        def start(task, slot):
            placed[task] = slot
            return pool.submit(work, task, slot)

        ended = [task for task, future in ablate.run_in_slots(list(durations), slots, start) if future.result() is None]
    return placed, spans, ended


def test_a_gpu_freed_early_takes_the_next_runs():
    # round-robin at submission would put a, c and e behind the long run on gpu0
    placed, _, ended = in_slots({"long": 1.0, "a": 0.02, "b": 0.02, "c": 0.02, "d": 0.2, "e": 0.02}, ["gpu0", "gpu1"])
    assert placed == {"long": "gpu0", "a": "gpu1", "b": "gpu1", "c": "gpu1", "d": "gpu1", "e": "gpu1"}
    assert ended == ["a", "b", "c", "d", "e", "long"]


def test_runs_of_uneven_length_never_share_a_slot():
    durations = {f"run{i}": (0.01, 0.15, 0.05, 0.3, 0.02)[i % 5] for i in range(15)}
    placed, spans, ended = in_slots(durations, ["s0", "s1", "s2"])
    assert sorted(ended) == sorted(durations) and set(placed.values()) == {"s0", "s1", "s2"}
    for slot in ("s0", "s1", "s2"):
        mine = sorted((start, end) for s, start, end in spans if s == slot)
        assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(mine)), (slot, mine)


@pytest.mark.slow
def test_the_dry_runs_estimate_is_near_the_real_runs_time(tmp_path):
    """The estimate (one timed step, the rest counted) against the training it estimates, on the
    same machine: within a factor of 3 (the machine may be doing other work at either time)."""
    args = ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--train-limit", "160", "--test-limit", "32",
            "--batch-size", "16", "--epochs", "2", "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "a")]
    dry = CliRunner().invoke(app, [*args, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    estimate = json.loads(dry.stdout)["estimate"]["seconds"]
    assert not (tmp_path / "a").exists()
    real = CliRunner().invoke(app, [*args, "--json"])
    assert real.exit_code == 0, real.output
    trained = json.loads((tmp_path / "a" / "all-cnn-c" / "lr0.05-seed0" / ablate.RESULT_NAME).read_text())["seconds"]
    assert estimate / 3 < trained < estimate * 3, (estimate, trained)
