"""The grid's contract: a combination is a full set of settings, every one checked as allconv train
checks a run before the first run starts (and by --dry-run alike); any setting can be an axis;
a setting that would not take effect is refused; durations, --jobs and preset keys."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allconv_cli import ablate
from allconv_cli.ablate import pool, slots
from allconv_cli.cli import app
from allconv_cli.cli.common import parse_duration
from allconv_cli.train.optimizers import OPTIMIZERS
from allconv_cli.train.settings import resolve

ABLATE = ["ablate", "--models", "all-cnn-c", "--preset", "smoke"]


def finished_run(config_json, folder, device, time_limit=None):
    """A finished run (no training), its test error its first milestone."""
    config = json.loads(config_json)
    result = {"model": config["model"], "lr": config["lr"], "seed": config["seed"], "seconds": 0, "epochs": 1,
              "val_error": None, "test_error": float(config["milestones"][0])}
    Path(folder).mkdir(parents=True)
    (Path(folder) / ablate.RESULT_NAME).write_text(json.dumps(result))
    return result


def image_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0.png").write_bytes(b"not read before a run")
    return root


# (extra options, --grid, words of the one line): each combination but the first is one the real
# command refuses, for a reason found only by the machine, the file system or another setting
REFUSED = {
    "a device this machine lacks": ([], "device=cpu,cuda:9", "'cuda:9'"),
    "a missing data folder": (["--dataset", "imagefolder"], "data_dir={good},{missing}", "missing"),
    "a missing weights file": ([], "init={missing}.safetensors", "missing.safetensors"),
    "fp16 on the CPU": (["--device", "cpu"], "precision=fp32,fp16", "fp16 autocast runs on CUDA only"),
    "an odd batch to mix": (["--batch-size", "15"], "augment=none,strong", "needs an even batch"),
    "a rate grid without a validation split": (["--lr-grid", "0.1,0.05"], "val_fraction=0.1,0",
                                               "needs a validation split"),
    "a setting of another optimizer": (["--optimizer", "sgd"], "muon_lr=0.03,0.05", 'only optimizer "muon" uses'),
    "milestones without their schedule": ([], "milestones=2:4,3:6", 'only schedule "paper" uses'),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry run"])
@pytest.mark.parametrize("case", REFUSED)
def test_every_combination_is_checked_before_the_first_run(tmp_path, monkeypatch, case, dry_run):
    monkeypatch.setattr(pool, "train_one", lambda *args: pytest.fail("a run started"))
    monkeypatch.setattr("allconv_cli.benchmark.run", lambda *args, **kwargs: pytest.fail("a step was timed"))
    options, grid, words = REFUSED[case]
    grid = grid.format(good=image_folder(tmp_path / "good"), missing=tmp_path / "missing")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*ABLATE, *options, "--grid", grid, "--out", str(out),
                                      *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    assert words in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: all-cnn-c with ")  # names the combination
    assert not out.exists()


def test_a_list_setting_is_an_axis(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "train_one", finished_run)
    out = tmp_path / "lists"
    args = [*ABLATE, "--schedule", "paper", "--epochs", "8", "--grid", "milestones=2:4,3:6", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["milestones"], r["test_error_mean"]) for r in rows] == [([2, 4], 2.0), ([3, 6], 3.0)]
    assert (out / "all-cnn-c" / "milestones=3:6" / "lr0.05-seed0" / ablate.RESULT_NAME).is_file()
    assert "| all-cnn-c (BatchNorm) | 3:6 |" in (out / "table.md").read_text()
    again = CliRunner().invoke(app, args)  # the same command continues: nothing to train
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize(("owner", "key"), [(o, k) for o, info in OPTIMIZERS.items() for k in info.settings])
def test_an_optimizers_own_setting_with_another_optimizer_is_one_line(owner, key):
    for other in (name for name in OPTIMIZERS if name != owner):
        value = OPTIMIZERS[owner].settings[key][1].default
        result = CliRunner().invoke(app, ["train", "--preset", "smoke", "--optimizer", other,
                                          f"--{key.replace('_', '-')}", str(value)])
        assert result.exit_code == 2, result.output
        assert f'only optimizer "{owner}" uses {key}' in result.stderr and f"give --optimizer {owner}" in result.stderr
        assert result.stderr.count("\n") == 1


def test_a_preset_for_one_optimizer_takes_another_given_after_it(tmp_path):
    preset = tmp_path / "muon.toml"
    preset.write_text('optimizer = "muon"\nmuon_lr = 0.03\nbatch_norm = true\n')
    assert resolve(str(preset), optimizer="sgd").optimizer == "sgd"  # the choice given later wins, in silence
    with pytest.raises(ValueError, match='only optimizer "muon" uses muon_lr'):
        resolve("faithful", muon_lr=0.03)  # faithful trains with sgd


@pytest.mark.parametrize("text", ["1:-30:00", "1:60:00", "0:00:60", "-1:00:00", "1.5:00:00", "1:2:3:4", "1::00",
                                  "0:-1", "1:30:-5"])
def test_a_duration_with_a_field_out_of_range_is_one_line(tmp_path, text):
    with pytest.raises(ValueError, match="minutes and seconds 0 to 59"):
        parse_duration(text)
    result = CliRunner().invoke(app, [*ABLATE, "--time-limit", text, "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "is not a duration" in result.stderr


def test_jobs_above_the_cores_warn_in_one_line_then_work(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr("allconv_cli.benchmark.run", lambda config, mode, **kwargs: {
        "device": "cpu", "device_name": "test CPU", "precision": "fp32",
        "results": {"train": {"images_per_s": 100.0}}})
    result = CliRunner().invoke(app, [*ABLATE, "--jobs", "3", "--dry-run", "--out", str(tmp_path / "j")])
    assert result.exit_code == 0, result.output
    assert result.stderr == ("--jobs 3 is more than this machine runs at once (2: a run per CPU core, or 4 per GPU): "
                             "the runs share them, each slower; going on\n")
    assert "1 run, 1 epoch, 256 training images in all" in result.stdout
    assert slots.check_jobs(2, "cpu") is None and slots.check_jobs(None, "cpu") is None
    with pytest.raises(ValueError, match=f"--jobs takes 1 to {slots.MAX_JOBS}"):
        slots.check_jobs(slots.MAX_JOBS + 1, "cpu")


def test_a_key_named_preset_suggests_no_preset(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('preset = "smoke"\n')
    result = CliRunner().invoke(app, ["train", "--preset", str(preset)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "a preset cannot name another" in result.stderr and "did you mean" not in result.stderr
    grid = CliRunner().invoke(app, [*ABLATE, "--grid", "presets=smoke", "--dry-run"])
    assert grid.exit_code == 2 and "preset" not in grid.stderr.split("did you mean")[-1]
