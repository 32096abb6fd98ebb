"""An optimizer is one entry of ``train.optimizers.OPTIMIZERS``: its settings, rules, option help and
checks follow from the entry, and a new entry trains from the command line."""

import dataclasses

import pytest
import torch
import typer
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.models.registry import create_model
from allconv_cli.train import optimizers, settings
from allconv_cli.train.config import FIELDS, TrainConfig
from allconv_cli.train.optim import make_optimizer
from allconv_cli.train.run_folder import RunFolder


def adamw(param_groups, config, device):
    return torch.optim.AdamW(param_groups, lr=config.lr)


@pytest.fixture
def with_adamw(monkeypatch):
    """An optimizer added as one entry, as a user's or a new release's would be."""
    entry = optimizers.OptimizerInfo(adamw, "AdamW on every parameter")
    monkeypatch.setitem(optimizers.OPTIMIZERS, "adamw", entry)
    return entry


def test_each_entrys_settings_are_settings_of_a_run():
    for name, info in optimizers.OPTIMIZERS.items():
        for key, (kind, declared) in info.settings.items():
            assert FIELDS[key].type is kind and getattr(TrainConfig(), key) == declared.default
            assert FIELDS[key].metadata["help"] == f"With --optimizer {name}: {declared.metadata['help']}"
    [option] = [o for o in typer.main.get_command(app).commands["train"].params if o.name == "optimizer"]
    for name, info in optimizers.OPTIMIZERS.items():
        assert f"{name}: {info.help}" in option.help


def test_a_new_entry_is_checked_built_and_trained(with_adamw, tmp_path):
    config = settings.resolve("smoke", optimizer="adamw")
    built = make_optimizer(create_model("all_cnn_c", batch_norm=True), config)
    assert isinstance(built, torch.optim.AdamW) and built.param_groups[0]["weight_decay"] == config.weight_decay
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--preset", "smoke", "--optimizer", "adamw", "--train-limit", "32",
                                      "--test-limit", "16", "--batch-size", "16", "--out", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert RunFolder(run).read_config().optimizer == "adamw"
    assert "exp_avg" in next(iter(torch.load(run / "state.pt", weights_only=True)["optimizer"]["state"].values()))


def test_an_entrys_rule_is_checked_from_the_entry(with_adamw, monkeypatch):
    monkeypatch.setitem(optimizers.OPTIMIZERS, "adamw",
                        dataclasses.replace(with_adamw, needs_batch_norm="a reason of its own"))
    with pytest.raises(ValueError, match="optimizer adamw needs batch_norm: a reason of its own"):
        settings.resolve("smoke", optimizer="adamw", batch_norm=False)
    with pytest.raises(ValueError, match="did you mean 'adamw'"):
        settings.resolve("smoke", optimizer="adamv")
