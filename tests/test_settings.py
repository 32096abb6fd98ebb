"""Each training setting is declared once (``train/config.py``): its option of ``allconv train``, its
checks and the names its implementation accepts all come from that declaration."""

import dataclasses
import json

import pytest
import typer

from allconv_cli.cli import app
from allconv_cli.train.optimizers import OPTIMIZERS
from allconv_cli.train.config import FIELDS, TrainConfig, kind, shown_default
from allconv_cli.train.fields import PANELS
from allconv_cli.train.settings import CHOICES, RANGES

# Each command that takes the training settings: its own options, and the settings it varies itself
COMMAND_OPTIONS = {
    "train": ({"out", "force", "resume", "stop_after", "time_limit", "threads", "as_json"}, set()),
    "ablate": ({"family", "models", "lr_grid", "grid", "seeds", "jobs", "shard", "time_limit", "out", "dry_run",
                "quiet", "as_json"}, {"model", "seed"}),
    "benchmark": ({"mode", "steps", "warmup", "threads", "as_json"}, set()),
}


def train_options(command="train"):
    return typer.main.get_command(app).commands[command].params


@pytest.mark.parametrize("command", list(COMMAND_OPTIONS))
def test_the_options_are_the_settings_and_the_commands_own(command):
    names = [option.name for option in train_options(command)]
    own, varied = COMMAND_OPTIONS[command]
    assert sorted(names) == sorted([*(set(FIELDS) - varied), *own])


@pytest.mark.parametrize(("command", "name"), [(command, name) for command, (_, varied) in COMMAND_OPTIONS.items()
                                               for name in FIELDS if name not in varied])
def test_each_setting_has_one_option_whose_default_choices_and_panel_come_from_it(command, name):
    [option] = [o for o in train_options(command) if o.name == name]
    meta = FIELDS[name].metadata
    assert option.default is None  # "not given": the preset or the default applies
    assert option.help.startswith(meta["help"])
    assert option.help.endswith(f"Default: {shown_default(name)}.")
    for choice in meta["choices"] or ():
        assert choice in option.help
    assert option.rich_help_panel == meta["panel"] and meta["panel"] in PANELS
    if kind(name) is bool:
        assert option.is_flag and option.secondary_opts  # --x/--no-x: either way can be given


def test_shown_defaults_follow_the_declaration():
    default = TrainConfig()
    for name, field in FIELDS.items():
        value = getattr(default, name)
        if value is None:
            assert shown_default(name) == field.metadata["default_text"]
        elif isinstance(value, bool):
            assert shown_default(name) == ("on" if value else "off")
        elif isinstance(value, float):
            assert float(shown_default(name)) == value


def test_checks_come_from_the_declaration():
    assert RANGES == {n: f.metadata["check"] for n, f in FIELDS.items() if f.metadata["check"] is not None}
    assert CHOICES == {n: f.metadata["choices"] for n, f in FIELDS.items() if f.metadata["choices"] is not None}
    assert dataclasses.fields(TrainConfig) and all("help" in f.metadata for f in dataclasses.fields(TrainConfig))


def test_every_optimizer_name_has_an_entry_and_every_entry_a_name():
    assert list(OPTIMIZERS) == list(CHOICES["optimizer"])


@pytest.mark.parametrize("preset", ["paper-cifar10", "paper-cifar10-aug", "paper-cifar100"])
def test_the_paper_presets_run_the_papers_recipe(preset):
    from allconv_cli.train.settings import deviations, resolve

    assert deviations(resolve(preset)) == []


def test_the_faithful_preset_deviates_only_where_short_runs_need_it():
    from allconv_cli.train.settings import deviations, resolve

    assert deviations(resolve("faithful")) == ["--preprocess standardize (paper: zca)",
                                              "--schedule cosine (paper: paper)", "--warmup-epochs 1.0 (paper: 0.0)"]


def test_a_run_names_each_deviation_by_its_option_and_the_papers_value():
    from allconv_cli.train.settings import deviations, resolve

    fast = deviations(resolve(None))  # the default recipe, as fast-cifar10 runs it
    assert deviations(resolve("fast-cifar10")) == fast
    for expected in ("--batch-norm (paper: off)", "--drop-rate 0.0 (paper: 0.5)", "--optimizer muon (paper: sgd)",
                     "--decay-weights-only (paper: --decay-all)", "--lr 0.2 (paper: 0.25 or 0.1 or 0.05 or 0.01)",
                     "--whiten frozen (paper: off)"):
        assert expected in fast
    assert not any(d.startswith("--milestones") for d in fast)  # unused by its schedule, and the paper's
    # a value of the paper's grid is none; batch size and initialization, which it leaves open, are none
    plain = deviations(resolve("paper-cifar10", lr=0.25, batch_size=64, weight_init="kaiming", epochs=3))
    assert plain == []
    assert deviations(resolve("paper-cifar10", lr=0.02, class_relu=False)) == [
        "--no-class-relu (paper: on)", "--lr 0.02 (paper: 0.25 or 0.1 or 0.05 or 0.01)"]


def test_a_variants_own_options_are_deviations_and_a_paper_networks_are_not():
    from allconv_cli.train.settings import deviations, resolve

    variant = deviations(resolve(None, model="all-cnn-c-bn"))
    assert variant[:3] == ["--batch-norm (paper: off)", "--drop-input 0.0 (paper: 0.2)", "--drop-rate 0.25 (paper: 0.5)"]
    # a variant named after a preset builds its own options; the preset's others stay
    assert deviations(resolve("paper-cifar10", model="all-cnn-c-bn"))[:3] == variant[:3]
    assert deviations(resolve("paper-cifar10", model="all-cnn-c")) == []
    assert not any("drop" in d for d in deviations(resolve("paper-imagenet")))  # its one dropout is the paper's


def test_every_setting_the_paper_states_declares_the_papers_value():
    from allconv_cli.train.fields import NOT_STATED

    stated = {name for name, field in FIELDS.items() if field.metadata["paper"] is not NOT_STATED}
    assert {"preprocess", "optimizer", "momentum", "weight_decay", "schedule", "milestones", "gamma"} <= stated
    assert not stated & {"batch_size", "weight_init", "epochs", "seed"}  # left open by the paper


def test_saved_settings_of_a_version_this_allconv_does_not_know_are_refused():
    from allconv_cli import __version__
    from allconv_cli.train.config import DEFAULTS_KEY, WRITER_KEY
    from allconv_cli.train.settings import from_json, resolve

    saved = json.loads(resolve(None).to_json())
    assert (saved[DEFAULTS_KEY], saved[WRITER_KEY]) == (2, __version__)
    for version in (99, 3, 0, "two", True, 2.0, None, [2]):
        with pytest.raises(ValueError) as refused:
            from_json(json.dumps({**saved, DEFAULTS_KEY: version, WRITER_KEY: "9.9.9"}), "run/config.json")
        message = str(refused.value)
        assert message.startswith("run/config.json was written by allconv 9.9.9 under defaults version ")
        assert f"this allconv ({__version__}) does not know (it reads 1 and 2)" in message and "\n" not in message
    del saved[WRITER_KEY]
    with pytest.raises(ValueError, match="written by another allconv under defaults version 99"):
        from_json(json.dumps({**saved, DEFAULTS_KEY: 99}))


def test_saved_settings_of_version_1_read_as_version_1_stated_or_not():
    """Version 1's defaults are the faithful preset's: a setting added since (whiten) and a null
    network option (the model's own, else the paper's) read as they ran, with or without the key."""
    from allconv_cli.train.config import DEFAULTS_KEY, WRITER_KEY
    from allconv_cli.train.settings import from_json, model_kwargs, resolve

    older = json.loads(resolve(None, model="all-cnn-c-bn").to_json())
    del older[WRITER_KEY], older["whiten"]
    older.update(batch_norm=None, drop_input=None, drop_rate=0.1, optimizer="sgd")
    for stated in ({}, {DEFAULTS_KEY: 1}):
        config = from_json(json.dumps({**{k: v for k, v in older.items() if k != DEFAULTS_KEY}, **stated}))
        assert config.whiten == "off"  # version 1's, not today's "frozen"
        assert model_kwargs(config, 10) == {"num_classes": 10, "batch_norm": True, "class_relu": True,
                                            "drop_input": 0.0, "drop_rate": 0.1}
        plain = from_json(json.dumps({**{k: v for k, v in older.items() if k != DEFAULTS_KEY}, **stated,
                                      "model": "all-cnn-c"}))
        assert (plain.batch_norm, plain.drop_input) == (False, 0.2)  # the paper's network then
    assert from_json(json.dumps({**older, DEFAULTS_KEY: 2})).whiten == "frozen"  # version 2: today's


def test_a_variant_named_after_a_preset_builds_its_own_network_and_is_validated_as_built():
    from allconv_cli.train.settings import resolve

    variant = resolve("faithful", model="all-cnn-c-bn", optimizer="muon")  # muon needs BatchNorm: the row has it
    assert (variant.batch_norm, variant.drop_input, variant.drop_rate) == (True, 0.0, 0.25)
    with pytest.raises(ValueError, match="optimizer muon needs batch_norm"):
        resolve("faithful", optimizer="muon")  # faithful's all-cnn-c has none
