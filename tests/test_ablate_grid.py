"""allconv ablate over any setting (--grid), split into shares (--shard) and under a wall-clock
limit (--time-limit); allconv train --time-limit."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allconv_cli import ablate
from allconv_cli.ablate import grid, pool
from allconv_cli.cli import app
from allconv_cli.train import TIME_LIMIT, TrainingStopped, resume, train
from allconv_cli.train.run_folder import RunFolder
from allconv_cli.train.settings import resolve


def recording_train_one(config_json, folder, device, time_limit=None):
    """A finished run whose test error says its batch size and seed (no training)."""
    config = json.loads(config_json)
    result = {"model": config["model"], "lr": config["lr"], "seed": config["seed"], "seconds": 0, "epochs": 1,
              "val_error": None if config["val_fraction"] == 0 else 50 - 100 * config["lr"],
              "test_error": config["batch_size"] / 10 + config["seed"], "time_limit": time_limit,
              "weight_init": config["weight_init"]}
    Path(folder).mkdir(parents=True)
    (Path(folder) / ablate.RESULT_NAME).write_text(json.dumps(result))
    return result


def test_grid_trains_every_combination_as_its_own_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "train_one", recording_train_one)
    out = tmp_path / "grid"
    result = CliRunner().invoke(app, ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--seeds", "2",
                                      "--grid", "batch_size=16,32", "--grid", "weight-init=xavier,caffe-xavier",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "table.json").read_text())
    assert [(r["batch_size"], r["weight_init"]) for r in rows] == [
        (16, "xavier"), (16, "caffe-xavier"), (32, "xavier"), (32, "caffe-xavier")]
    assert [r["test_error_mean"] for r in rows] == [2.1, 2.1, 3.7, 3.7]  # batch / 10 + the mean seed, 0.5
    folder = out / "all-cnn-c" / "batch_size=32,weight_init=caffe-xavier" / "lr0.05-seed1"
    assert json.loads((folder / ablate.RESULT_NAME).read_text())["weight_init"] == "caffe-xavier"
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| network | batch_size | weight_init | params |")
    assert "| all-cnn-c (BatchNorm) | 32 | caffe-xavier | 1,369,738 |" in table[5]
    assert (out / "table.csv").read_text().splitlines()[0].startswith("model,batch_size,weight_init,params,")
    assert ablate.row_label(rows[3]) == "all-cnn-c (BatchNorm), batch_size=32, weight_init=caffe-xavier"
    # the same command continues; another grid in the same folder is refused
    again = CliRunner().invoke(app, ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--seeds", "2",
                                     "--grid", "batch_size=16,32", "--out", str(out)])
    assert again.exit_code == 2 and "holds an ablation with other settings" in again.stderr


@pytest.mark.parametrize(("grid", "message"), [
    ("lr=0.1,0.01", "lr is varied by --lr-grid"),
    ("seed=1,2", "seed is varied by --seeds"),
    ("batch_size", "write KEY=V1,V2"),
    ('batch_size=16,abc', 'batch_size = "abc" is not allowed'),
    ("batch_size=0", "of at least 1"),
    ("batch_sise=16", "did you mean 'batch_size'"),
    ("weight_init=xavier,xavier", "repeats a value"),
    ("optimizer=sgd,muon", "optimizer muon needs batch_norm"),
])
def test_a_bad_grid_is_one_line_before_any_run(tmp_path, monkeypatch, grid, message):
    monkeypatch.setattr(pool, "train_one", recording_train_one)
    args = ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--batch-norm" if "muon" not in grid else
            "--no-batch-norm", "--grid", grid, "--out", str(tmp_path / "bad")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_grid_values_take_each_settings_type():
    grid = ablate.parse_grid(["milestones=2:4,3:6", "nesterov=on,false", "label_smoothing=0,0.1", "--decay-all=no"])
    assert grid == {"milestones": [[2, 4], [3, 6]], "nesterov": [True, False], "label_smoothing": [0.0, 0.1],
                    "decay_all": [False]}
    assert ablate.variant_name(ablate.variants(grid)[0]) == "milestones=2:4,nesterov=true,label_smoothing=0,decay_all=false"


@pytest.mark.parametrize("lr_grid", [None, "0.1,0.05"])
def test_two_shards_give_the_table_of_one_job(tmp_path, monkeypatch, lr_grid):
    monkeypatch.setattr(pool, "train_one", recording_train_one)
    args = ["ablate", "--models", "all-cnn-c,model-c", "--preset", "smoke", "--seeds", "3", "--json",
            *(["--lr-grid", lr_grid] if lr_grid else [])]
    whole = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert whole.exit_code == 0, whole.output
    shared = str(tmp_path / "shared")
    first = CliRunner().invoke(app, [*args, "--out", shared, "--shard", "1/2"])
    assert first.exit_code == 0 and "shard 1/2 is done" in first.stderr  # shard 2's runs are not there yet
    # the last to finish trains what shard 1 left (its later seeds, waiting on shard 2's rates) and writes the table
    second = CliRunner().invoke(app, [*args, "--out", shared, "--shard", "2/2"])
    assert second.exit_code == 0, second.output
    assert (tmp_path / "shared" / "table.json").read_text() == (tmp_path / "one" / "table.json").read_text()
    trained = sorted(p.parent.relative_to(shared) for p in Path(shared).rglob(ablate.RESULT_NAME))
    assert len(trained) == len(set(trained)) == 2 * ((2 if lr_grid else 1) + 2)


def slow_train_one(config_json, folder, device, time_limit=None):
    """recording_train_one after a pause that differs by run, so that shards running at once
    overlap in every order: one finishes its grid runs while another still trains its own."""
    config = json.loads(config_json)
    time.sleep(0.03 * ((config["seed"] * 7 + int(config["lr"] * 100) + len(config["model"])) % 5))
    return recording_train_one(config_json, folder, device, time_limit)


def _shard(out, grid, index, count, jobs):
    """One shard's process: exit 0 once its work is done (with the table or not), 1 on any error."""
    try:
        ablate.ablate(resolve("smoke", val_fraction=0.1), ["all-cnn-c", "model-c"], grid, [0, 1, 2], out,
                      jobs=jobs, settings_grid={"batch_size": [16, 32]}, share=ablate.Share(index, count))
    except BaseException:
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize(("grid", "count"), [([0.05], 2), ([0.1, 0.05], 2), ([0.1, 0.05, 0.01], 3),
                                             ([0.1, 0.05], 5)])
def test_shards_at_once_leave_the_table_of_one_job(tmp_path, monkeypatch, grid, count):
    """However many shards run at the same time, with or without a rate grid: every run trained
    once, and the table the same as one job's."""
    monkeypatch.setattr(pool, "train_one", slow_train_one)
    one = ablate.ablate(resolve("smoke", val_fraction=0.1), ["all-cnn-c", "model-c"], grid, [0, 1, 2],
                        tmp_path / "one", settings_grid={"batch_size": [16, 32]})
    assert one is not None
    context = multiprocessing.get_context("fork")  # the fake trainer travels with the process
    shards = [context.Process(target=_shard, args=(tmp_path / "shared", grid, k, count, 1))
              for k in range(1, count + 1)]
    for shard in shards:
        shard.start()
    for shard in shards:
        shard.join(60)
        assert shard.exitcode == 0
    assert (tmp_path / "shared" / "table.json").read_text() == (tmp_path / "one" / "table.json").read_text()
    trained = [p.parent for p in (tmp_path / "shared").rglob(ablate.RESULT_NAME)]
    assert len(trained) == 2 * 2 * (len(grid) + 2)


@pytest.mark.parametrize(("shard", "message"), [("3/2", "1 <= K <= N"), ("1", "write K/N"), ("a/b", "write K/N")])
def test_a_bad_shard_is_one_line(tmp_path, shard, message):
    result = CliRunner().invoke(app, ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--shard", shard,
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.stderr


def test_ablate_time_limit_reaches_every_run_and_exits_124(tmp_path, monkeypatch):
    limits = []

    def stopped_at_the_limit(config_json, folder, device, time_limit=None):
        limits.append(time_limit)
        raise TrainingStopped(TIME_LIMIT, Path(folder))

    monkeypatch.setattr(pool, "train_one", stopped_at_the_limit)
    result = CliRunner().invoke(app, ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--time-limit", "2h",
                                      "--out", str(tmp_path / "t")])
    assert result.exit_code == 124, result.output
    assert "time limit reached; run the same command again to continue" in result.stderr
    assert len(limits) == 1 and 7000 < limits[0] <= 7200
    bad = CliRunner().invoke(app, ["ablate", "--models", "all-cnn-c", "--preset", "smoke", "--time-limit", "soon",
                                   "--out", str(tmp_path / "t")])
    assert bad.exit_code == 2 and "is not a duration" in bad.stderr


@pytest.mark.slow
def test_train_stops_resumably_before_its_time_limit(tmp_path):
    config = resolve("smoke", epochs=500, train_limit=64, test_limit=16, batch_size=16, save_every=1000)
    with pytest.raises(TrainingStopped) as stop:
        train(config, tmp_path / "run", time_limit=8)
    assert stop.value.signum == TIME_LIMIT and "stopped at the time limit" in str(stop.value)
    assert RunFolder(tmp_path / "run").holds_run()  # a checkpoint, whatever the cadence
    summary = resume(tmp_path / "run", stop_after=1)
    assert summary["epochs_done"] >= 1 and not summary["finished"]


def test_each_model_builds_its_own_network_under_a_preset():
    """--models takes a model as --model does: a variant's row beats the preset's network keys, an
    option given beats the row, and the table names each network as built, with the paper's error
    beside the paper's network only."""
    from allconv_cli.models.registry import NETWORKS, network_name
    from allconv_cli.train import settings

    names = ["all-cnn-c-bn", "all-cnn-c"]
    base = settings.resolve("faithful")
    for given, bn_row in (({}, NETWORKS["all_cnn_c_bn"].options), ({"batch_norm": False}, {"batch_norm": False})):
        networks = {name: settings.model_network("faithful", given, name) for name in names}
        variant, paper = grid.check_plan(base, names, [0.05], [0], [()], networks)
        assert {key: getattr(variant, key) for key in bn_row} == bn_row
        assert not paper.batch_norm and paper.drop_rate == base.drop_rate  # the preset's own network
    networks = {name: settings.model_network("paper-cifar10", {}, name) for name in names}
    results = {ablate.Run(name, 0.05, 0, ()): {"test_error": 20.0} for name in names}
    rows = ablate.table_rows([(name, ()) for name in names], {(name, ()): 0.05 for name in names}, [0], results,
                             settings.resolve("paper-cifar10"), networks)
    assert [row["network"] for row in rows] == ["all-cnn-c-bn", network_name("all-cnn-c")[0]]
    assert rows[0]["paper_table3"] is None and rows[1]["paper_table3"] == NETWORKS["all_cnn_c"].paper_error["cifar10"]
