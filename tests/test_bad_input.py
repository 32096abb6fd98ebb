"""Bad input anywhere gets one line (issue #21).

Tables of bad presets, options, run configurations, checkpoint metadata and tensors, data
folders and output paths, each run through every command that reads it (exit code 2, one
``Error:`` line on stderr, no traceback, nothing written), and property-based checks
(hypothesis) of the readers behind those commands on generated input. No case trains: every
check fires before the first step.
"""

import inspect
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.data import datasets
from allconv_cli.files import weights as checkpoint
from allconv_cli.models import AllConvNet, create_model
from allconv_cli.train import settings as configuration

runner = CliRunner()
TINY = ["--train-limit", "8", "--test-limit", "4", "--batch-size", "4", "--epochs", "1", "--device", "cpu"]
CLASSES = ["cat", "dog", "ship"]
STANDARDIZE = {"kind": "standardize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
# The same generated inputs on every run (a failure reproduces anywhere), and no example database
# left in the checkout.
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, *needles) -> str:
    """Exit 2, no traceback, and stderr one ``Error:`` line holding every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def write_images(folder: Path, count: int, size=(8, 8), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def imagefolder(root: Path, splits=("train", "val"), classes=CLASSES, per_class=3) -> Path:
    for split in splits:
        for cls in classes:
            write_images(root / split / cls, per_class)
    return root


def fake_cifar(root: Path, n=8) -> Path:
    """torchvision's CIFAR-10 layout, small: uint8 (N, 3072) pixels and int labels per batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


# --- presets, options and run configurations ------------------------------------------------

# Values of the wrong type for each kind of setting, as TOML writes them: bool is not an int,
# a string is not a number, a date is not a string.
WRONG_TYPE = {
    int: ['"abc"', "1.5", "true", "[1]", "{ a = 1 }"],
    float: ['"abc"', "true", "nan", "inf", "[0.1]"],
    bool: ["1", '"true"', "0.0"],
    str: ["5", "true", "[1]", "1979-05-27"],
    list: ['"200"', "200", "[1.5]", "[true]", '["a"]'],
}
# Values of the right type out of each setting's range, or not among its choices.
OUT_OF_RANGE = {
    "epochs": ["0", "-3"], "batch_size": ["0"], "eval_every": ["0"], "workers": ["-1"], "crop": ["-1"], "shift": ["-1"],
    "crop_epochs": ["-1"], "train_limit": ["-5", "0"], "test_limit": ["0"], "seed": ["-1"],
    "lr": ["0", "-0.1"], "momentum": ["1.0", "-0.5"], "weight_decay": ["-0.001"], "gamma": ["0"],
    "warmup_epochs": ["-1"], "label_smoothing": ["1"], "bias_lr_scale": ["0", "-1"], "muon_lr": ["0", "-0.02"], "muon_momentum": ["1", "-0.6"], "bn_momentum": ["0", "1.5"], "ema_decay": ["1.0"], "lookahead_decay": ["1", "-0.5"], "save_every": ["0"], "save_minutes": ["-1"], "val_fraction": ["1", "-0.1"],
    "drop_input": ["1"], "drop_rate": ["-0.5"], "milestones": ["[0]", "[250, 200]", "[200, 200]"],
    "model": ['"all-cnn-x"', '""'], "dataset": ['"cifar11"'], "augment": ['"paperr"'], "preprocess": ['"pca"'],
    "schedule": ['"step"'], "precision": ['"fp8"'], "weight_init": ['"he"'],
    "target": ["0", "100.5"], "tta": ['"mirror"'], "flips": ['"always"'], "whiten": ['"yes"'], "optimizer": ['"adam"'],
}


HINTS = typing.get_type_hints(configuration.TrainConfig)


def _kind(key: str):
    """The type a setting holds (int for ``int | None``, list for ``list[int]``)."""
    hint = HINTS[key]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


PRESET_VALUES = ([(key, value) for key in configuration.FIELDS if key != "preset" for value in WRONG_TYPE[_kind(key)]]
                 + [(key, value) for key, values in OUT_OF_RANGE.items() for value in values])

# Whole files: the rules between settings, and files that are not presets.
PRESET_FILES = [
    ("crop = 24", "crop_epochs"),
    ("crop_epochs = 3", "crop_epochs"),
    ("crop = 8\ncrop_epochs = 3", "at most epochs (1)"),  # TINY gives --epochs 1
    ("shift = 32", "shift 32 px is not smaller than all-cnn-c's 32x32 input"),
    ('schedule = "cosine"\nmilestones = [200]', "milestones"),
    ("milestones = [10]", "only schedule \"paper\""),
    ('schedule = "paper"\nmilestones = "1"', "milestones"),
    ("nesterov = true\nmomentum = 0.0", "nesterov"),
    ('data_dir = "somewhere"', "--data-dir somewhere"),
    ("learning_rate = 0.1", "learning_rate"),
    ('preset = "smoke"', "a preset cannot name another"),
    ("[optim]\nlr = 0.1", 'unknown key "optim"'),
    ("epochs = ", "not valid TOML"),
    ("epochs = 1\nepochs = 2", "not valid TOML"),
]


def test_every_range_and_choice_has_a_bad_value_in_the_table():
    assert set(configuration.RANGES) | set(configuration.CHOICES) | {"model"} <= set(OUT_OF_RANGE)


@pytest.mark.parametrize("key, value", PRESET_VALUES)
def test_bad_preset_value(tmp_path, key, value):
    preset = tmp_path / "mine.toml"
    preset.write_text(f"{key} = {value}\n")
    error = one_line(invoke("train", "--preset", preset, *TINY, "--out", tmp_path / "run"), preset, key)
    assert "is not allowed" in error
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("text, needle", PRESET_FILES)
def test_bad_preset_file(tmp_path, text, needle):
    preset = tmp_path / "mine.toml"
    preset.write_text(text + "\n")
    one_line(invoke("train", "--preset", preset, *TINY, "--out", tmp_path / "run"), preset, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(b'model = "all-cnn-c"\nlr = 0.1 # \xff\xfe caf\xe9\n'), "not UTF-8"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: None, "does not exist"),
])
def test_preset_that_is_not_a_text_file(tmp_path, make, needle):
    preset = tmp_path / "mine.toml"
    make(preset)
    one_line(invoke("train", "--preset", preset, *TINY), preset, needle)


BAD_OPTIONS = [
    (["--train-limit", "-5"], "the options: --train-limit -5"),
    (["--test-limit", "0"], "--test-limit 0"),
    (["--epochs", "0"], "--epochs 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2**63)], "[0, 2^63)"),
    (["--lr", "nan"], "--lr NaN"),
    (["--lr", "inf"], "--lr Infinity"),
    (["--lr", "0"], "above 0"),
    (["--momentum", "1"], "--momentum"),
    (["--workers", "-1"], "--workers"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--label-smoothing", "-0.1"], "--label-smoothing"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--precision", "fp8"], "--precision fp8"),
    (["--milestones", "200"], "only schedule \"paper\""),
    (["--schedule", "paper", "--milestones", "0,5"], "--milestones 0,5"),
    (["--preset", "smoke", "--schedule", "paper", "--milestones", "3,2"], "increasing"),
    (["--data-dir", "somewhere"], "--data-dir somewhere"),
    (["--nesterov", "--momentum", "0"], "nesterov"),
    (["--crop", "8", "--crop-epochs", "2"], "at most epochs (1)"),
]


@pytest.mark.parametrize("args, needle", BAD_OPTIONS)
def test_bad_options(tmp_path, args, needle):
    one_line(invoke("train", *TINY, *args, "--out", tmp_path / "run"), needle)
    assert not (tmp_path / "run").exists()


def test_odd_but_valid_settings_resolve(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('schedule = "paper"\nmilestones = [5, 8]\nlr = 1\n')
    config = configuration.resolve(str(preset))
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.milestones == [5, 8]
    # the options' schedule replaces the preset's: its milestones no longer apply, and are no error
    assert configuration.resolve("paper-cifar10", schedule="cosine").schedule == "cosine"
    assert configuration.resolve(None, schedule="paper", milestones=[3]).milestones == [3]


BAD_CONFIG_JSON = [
    ("{", "not valid JSON"),
    ("[]", "JSON array"),
    ("5", "JSON value"),
    ('{"epochs": "abc"}', 'epochs = "abc"'),
    ('{"epochs": 1.5}', "epochs = 1.5"),
    ('{"epochs": null}', "epochs = null"),
    ('{"lr": NaN}', "lr = NaN"),
    ('{"seed": -1}', "seed = -1"),
    ('{"milestones": "200"}', 'milestones = "200"'),
    ('{"model": 5}', "model = 5"),
    ('{"crop": 24}', "crop_epochs"),
    ('{"train_limit": -5}', "train_limit = -5"),
]


@pytest.mark.parametrize("text, needle", BAD_CONFIG_JSON)
def test_bad_config_json(tmp_path, text, needle):
    with pytest.raises(ValueError, match="runs/x/config.json") as error:
        configuration.from_json(text, "runs/x/config.json")
    assert needle in str(error.value) and "\n" not in str(error.value)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    one_line(invoke("train", "--resume", run), needle)


def test_old_config_json_keys_are_dropped_and_ints_become_floats():
    config = configuration.from_json('{"amp": true, "lr": 1, "epochs": 2}')
    assert (config.lr, config.epochs) == (1.0, 2) and isinstance(config.lr, float)


def toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, "nan" if value != value else repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    # JSON's string escapes are TOML's, but TOML also wants DEL escaped
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f") if isinstance(value, str) else str(value)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # TOML has no lone surrogates
SCALARS = (st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | TEXT
           | st.sampled_from(["all-cnn-c", "paper", "zca", "cifar10", "sample", "fp32", "none"]))
TOML_VALUES = SCALARS | st.lists(SCALARS, max_size=4) | st.lists(st.integers(-5, 400), max_size=4)
KEYS = [key for key in configuration.FIELDS if key != "preset"]


@FUZZ
@given(settings_=st.dictionaries(st.sampled_from(KEYS), TOML_VALUES, min_size=1, max_size=3))
def test_generated_presets_resolve_or_fail_in_one_line(settings_):
    with tempfile.TemporaryDirectory() as folder:
        preset = Path(folder) / "gen.toml"
        preset.write_text("".join(f"{key} = {toml(value)}\n" for key, value in settings_.items()), encoding="utf-8")
        try:
            config = configuration.resolve(str(preset))
        except ValueError as err:
            message = str(err)
            assert str(preset) in message and "\n" not in message, message
            assert any(key in message or key.replace("_", "-") in message for key in settings_), message
            return
    for key in settings_:  # accepted: every value has its setting's type
        kind = _kind(key)
        value = getattr(config, key)
        assert value is None or isinstance(value, kind), (key, value)
        assert not (kind is int and isinstance(value, bool)), (key, value)


# --- checkpoints ------------------------------------------------------------------------------

def good_meta(**changes) -> dict:
    meta = {"model": "all_cnn_c", "model_kwargs": {"num_classes": 3}, "classes": CLASSES,
            "input_size": [3, 32, 32], "preprocess": STANDARDIZE, "dataset": "imagefolder", "data_dir": None,
            "augment": "paper", "epoch": 1, "metrics": {}, "format": 1, "versions": {}}
    meta.update(changes)
    return meta


def good_state() -> dict:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in create_model("all-cnn-c", num_classes=3).state_dict().items()}


def zca_checkpoint() -> tuple[dict, dict]:
    """A 1-channel 16x16 model with GCN + ZCA (D = 256): small preprocessing tensors."""
    from allconv_cli.data.preprocess import fit_zca

    zca_meta, tensors = fit_zca(torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))).to_meta()
    model = create_model("all-cnn-c", num_classes=3, in_chans=1)
    state = {**model.state_dict(), **{checkpoint.PREPROCESS_PREFIX + k: v for k, v in tensors.items()}}
    return (good_meta(model_kwargs={"num_classes": 3, "in_chans": 1}, input_size=[1, 16, 16], preprocess=zca_meta),
            state)


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _changed(state: dict, key: str, value) -> dict:
    return {**state, key: value}


WEIGHT = "features.conv1.conv.weight"
BIAS = "features.conv1.conv.bias"


def checkpoint_cases() -> list[tuple[str, object, dict | None, str]]:
    """(name, the allconv metadata (JSON text, or a value to dump), tensors (None: the good ones),
    a needle of the error)."""
    state = good_state()
    m = good_meta()
    zca_meta, zca_state = zca_checkpoint()
    weight = state[WEIGHT]
    cases = [
        ("not JSON", "{'model': 'all_cnn_c'}", None, "not JSON"),
        ("nested too deep", "[" * 100_000, None, "not JSON"),
        ("a list", [], None, "JSON array"),
        ("a number", 5, None, "JSON number"),
        ("a string", json.dumps("all_cnn_c"), None, "JSON string"),
        ("null", None, None, "JSON null"),
    ]
    cases += [(f"no {key}", _without(m, key), None, f"no '{key}'")
              for key in ("model", "classes", "input_size", "preprocess")]
    values = {
        "model": [5, "resnet18", None, ["all_cnn_c"]],
        "model_kwargs": [[], "num_classes=3", {"pretrained": True}, {"num_classes": 3, "depth": 5},
                         {"num_classes": 0}, {"num_classes": "3"}, {"num_classes": 3.0}, {"num_classes": True},
                         {"num_classes": 2**40}, {"num_classes": 3, "drop_rate": 1.5},
                         {"num_classes": 3, "class_relu": "no"}],
        "classes": ["cat", [1, 2, 3], ["cat"], None],
        "input_size": [[3, 32], [3, 32, 32, 1], [3, -1, 32], [3, 4, 4], [3, 100_000, 100_000], "32",
                       [3.0, 32, 32], [3, True, 32]],
        "preprocess": [{}, [], {"kind": "pca"}, {"kind": "standardize"}, {**STANDARDIZE, "mean": [0.5, 0.5]},
                       {**STANDARDIZE, "std": [0.0, 0.25, 0.25]}, {**STANDARDIZE, "std": [float("nan")] * 3},
                       {**STANDARDIZE, "mean": ["a", "b", "c"]}, {"kind": "zca", "gcn_scale": 55.0, "zca_bias": 0.1}],
        "dataset": ["cifar11", 5],
        "data_dir": [5],
        "augment": ["rotate", None],
        "epoch": [-1, "3", 1.5],
        "format": [99, "1", 0],
        "metrics": [[]],
        "paper_error": ["7.25"],
        "versions": ["torch 2"],
    }
    cases += [(f"{key} = {json.dumps(value)[:30]}", {**m, key: value}, None, key)
              for key, values_ in values.items() for value in values_]
    cases += [  # metadata that is well-formed but does not describe these weights
        ("3,000,000 classes", {**m, "model_kwargs": {"num_classes": 3_000_000}}, None,
         "[3000000, 192, 1, 1] in the model"),
        ("30,000,000 classes", {**m, "model_kwargs": {"num_classes": 30_000_000}}, None, "[30000000, 192, 1, 1]"),
        ("1 input channel", {**m, "model_kwargs": {"num_classes": 3, "in_chans": 1}}, None,
         "[96, 1, 3, 3] in the model"),
        ("batch_norm true", {**m, "model_kwargs": {"num_classes": 3, "batch_norm": True}}, None, "missing features"),
        ("1-channel input_size", {**m, "input_size": [1, 32, 32]}, None, "preprocess.mean"),
        ("1-channel input_size and preprocess", {**m, "input_size": [1, 32, 32], "preprocess": {
            "kind": "standardize", "mean": [0.5], "std": [0.25]}}, None, "input_size [1, 32, 32] for a model of 3"),
        ("4 class names", {**m, "classes": ["a", "b", "c", "d"]}, None, "names 4 classes for a model of 3"),
    ]
    cases += [
        ("NaN weight", m, _changed(state, WEIGHT, torch.full_like(weight, float("nan"))), "NaN or infinite"),
        ("inf bias", m, _changed(state, BIAS, torch.full_like(state[BIAS], float("inf"))), "NaN or infinite"),
        ("integer weight", m, _changed(state, WEIGHT, weight.to(torch.int32)), "holds I32 values"),
        ("bool weight", m, _changed(state, WEIGHT, weight > 0), "holds BOOL values"),
        ("missing tensor", m, _without(state, BIAS), "missing"),
        ("extra tensor", m, _changed(state, "features.conv99.weight", torch.zeros(1)), "unexpected"),
        ("wrong shape", m, _changed(state, WEIGHT, torch.zeros(96, 3, 5, 5)), "[96, 3, 5, 5]"),
        ("stray preprocess tensor", m, _changed(state, "preprocess.zca_matrix", torch.eye(3)), "zca_matrix"),
        ("zca without tensors", zca_meta, {k: v for k, v in zca_state.items() if "preprocess." not in k},
         "zca_matrix"),
        ("zca matrix of another size", zca_meta, _changed(zca_state, "preprocess.zca_matrix", torch.eye(3)),
         "zca_matrix"),
        ("NaN zca matrix", zca_meta, _changed(zca_state, "preprocess.zca_matrix", torch.full((256, 256), float("nan"))),
         "NaN or infinite"),
        ("zca gcn_scale -1", {**zca_meta, "preprocess": {**zca_meta["preprocess"], "gcn_scale": -1.0}}, zca_state,
         "gcn_scale"),
    ]
    return cases


CHECKPOINT_CASES = checkpoint_cases()


def write_checkpoint(path: Path, meta, tensors: dict | None = None) -> Path:
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(tensors if tensors is not None else good_state(), str(path), metadata={"allconv": text, "format": "pt"})
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Each bad checkpoint as a file, a good one, a tiny ImageFolder and an image."""
    folder = tmp_path_factory.mktemp("bad-input")
    for i, (_, meta, tensors, _) in enumerate(CHECKPOINT_CASES):
        write_checkpoint(folder / f"case{i}.safetensors", meta, tensors)
    write_checkpoint(folder / "good.safetensors", good_meta())
    save_file({"w": torch.zeros(1)}, str(folder / "foreign.safetensors"))
    (folder / "notes.safetensors").write_text("not a checkpoint")
    imagefolder(folder / "data", per_class=2)
    write_images(folder / "images", 1, size=(20, 30))
    return folder


def commands(workdir: Path, checkpoint_path: Path, out: Path) -> dict[str, list]:
    """Every command that reads a checkpoint, ready to run on ``checkpoint_path``."""
    data = ["--dataset", "imagefolder", "--data-dir", workdir / "data"]
    return {
        "eval": ["eval", checkpoint_path, *data, "--device", "cpu", "--out", out / "confusion.png"],
        "visualize": ["visualize", workdir / "images" / "0.png", "--checkpoint", checkpoint_path, "--device", "cpu",
                      "--out", out / "grid.png"],
        "export": ["export", checkpoint_path, "--format", "safetensors", "--out", out / "export"],
        "train --init": ["train", "--init", checkpoint_path, *data, *TINY, "--out", out / "run"],
    }


COMMANDS = ["eval", "visualize", "export", "train --init"]


def test_the_good_checkpoint_loads_everywhere(workdir, tmp_path):
    """The cases below break a checkpoint that works: each command reads the good one."""
    good = commands(workdir, workdir / "good.safetensors", tmp_path)
    assert invoke(*good["eval"]).exit_code == 0
    assert invoke(*good["visualize"]).exit_code == 0
    assert invoke(*good["export"]).exit_code == 0
    model, meta, _ = checkpoint.load_model(workdir / "good.safetensors")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3) and meta["classes"] == CLASSES


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", range(len(CHECKPOINT_CASES)), ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint(workdir, tmp_path, command, case):
    path = workdir / f"case{case}.safetensors"
    one_line(invoke(*commands(workdir, path, tmp_path)[command]), path.name, CHECKPOINT_CASES[case][3])
    assert not (tmp_path / "export").exists() and not (tmp_path / "grid.png").exists()
    if command == "train --init" and "NaN" not in CHECKPOINT_CASES[case][3]:  # values are read with the weights
        assert not (tmp_path / "run").exists()  # the header is checked with the settings


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, needle", [("foreign.safetensors", "without allconv metadata"),
                                          ("notes.safetensors", "not a readable"),
                                          ("nowhere.safetensors", "no checkpoint")])
def test_checkpoint_that_is_not_one(workdir, tmp_path, command, name, needle):
    one_line(invoke(*commands(workdir, workdir / name, tmp_path)[command]), name, needle)


def test_model_kwargs_schema_follows_the_model():
    options = set(inspect.signature(AllConvNet.__init__).parameters) - {"self", "layers"}
    assert set(checkpoint.MODEL_KWARGS) == options


def test_a_checkpoint_claiming_millions_of_classes_fails_without_allocating(tmp_path):
    """The issue's 5.5 MB files: the class conv alone would take 2.3 GB (3 M classes), 23 GB (30 M)."""
    paths = [write_checkpoint(tmp_path / f"{classes}.safetensors", good_meta(model_kwargs={"num_classes": classes}))
             for classes in (3_000_000, 30_000_000)]
    script = ("import resource, sys\nfrom allconv_cli.files.weights import load_model\n"
              "import allconv_cli.train.settings, allconv_cli.data.datasets, allconv_cli.models  # imports are not the point\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "for path in sys.argv[1:]:\n    try:\n        load_model(path)\n    except ValueError as err:\n"
              "        print(err)\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    done = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True, timeout=120)
    *messages, grown_kib = done.stdout.strip().splitlines()
    assert len(messages) == 2, done.stdout + done.stderr
    for message, classes in zip(messages, (3_000_000, 30_000_000)):
        assert "does not fit all-cnn-c" in message and f"[{classes}, 192, 1, 1] in the model" in message
    assert int(grown_kib) < 50 * 1024, grown_kib  # KiB: the two 5.5 MB files, not gigabytes


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
META_PATHS = ([(key,) for key in good_meta()] + [("model_kwargs", key) for key in checkpoint.MODEL_KWARGS]
              + [("preprocess", key) for key in ("kind", "mean", "std")])


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(META_PATHS), st.none() | JSON_VALUES, st.booleans()),
                        min_size=1, max_size=3))
def test_generated_metadata_loads_or_fails_in_one_line(changes):
    meta = json.loads(json.dumps(good_meta()))
    for path, value, delete in changes:
        parent = meta
        for key in path[:-1]:
            parent = parent.setdefault(key, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict):
            if delete:
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
    with tempfile.TemporaryDirectory() as folder:
        file = write_checkpoint(Path(folder) / "gen.safetensors", meta)
        try:
            model, loaded, preprocess = checkpoint.load_model(file)
        except ValueError as err:
            assert str(file) in str(err) and "\n" not in str(err), str(err)
            return
    from allconv_cli.data.preprocess import from_meta

    channels, height, width = loaded["input_size"]  # accepted: it runs, one score per class
    x = from_meta(loaded["preprocess"], preprocess)(torch.rand(1, channels, height, width))
    assert model(x).shape == (1, len(loaded["classes"]))


# --- data folders -------------------------------------------------------------------------

def _rename(root: Path, old: str, new: str):
    (root / old).rename(root / new)


# (name, change, needle for train, needle for eval): eval reads only val/, and compares its class
# names with train/'s, so a problem inside train/ shows there as a difference of class folders.
FOLDER_CASES = [
    ("a class named otherwise in val", lambda r: _rename(r, "val/ship", "val/boat"), "only in train: ship",
     "only in val: boat"),
    ("an extra class in train", lambda r: write_images(r / "train" / "frog", 2), "only in train: frog",
     "only in train: frog"),
    ("an empty class folder in train", lambda r: (r / "train" / "frog").mkdir(), "no images", "only in train: frog"),
    ("an empty class folder in val", lambda r: [shutil.rmtree(r / "val" / "dog"), (r / "val" / "dog").mkdir()],
     "no images", "no images"),
    ("one class", lambda r: [shutil.rmtree(r / s / c) for s in ("train", "val") for c in ("dog", "ship")],
     "at least two", "at least two"),
    ("images without class folders", lambda r: [shutil.rmtree(r / "train"), write_images(r / "train", 3)],
     "no class sub-folders", "only in val: cat, dog, ship"),
    ("no val or test", lambda r: shutil.rmtree(r / "val"), "no folder", "no folder"),
    ("a broken image", lambda r: (r / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really"),
     "broken.png", "broken.png"),
    ("only hidden folders", lambda r: [shutil.rmtree(r / "val"), write_images(r / "val" / ".cache", 2)],
     "no class sub-folders", "no class sub-folders"),
]


def folder_commands(root: Path, workdir: Path, out: Path, dataset: str = "imagefolder") -> dict[str, list]:
    data = ["--dataset", dataset, "--data-dir", root]
    return {"train": ["train", *data, *TINY, "--out", out / "run"],
            "eval": ["eval", workdir / "good.safetensors", *data, "--device", "cpu", "--out", out / "c.png"]}


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("name, change, train_needle, eval_needle", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_bad_imagefolder(workdir, tmp_path, command, name, change, train_needle, eval_needle):
    root = imagefolder(tmp_path / "data", per_class=2)
    change(root)
    one_line(invoke(*folder_commands(root, workdir, tmp_path)[command]), root,
             train_needle if command == "train" else eval_needle)
    if name != "a broken image":  # the layout is checked with the settings, before a run folder is made
        assert not (tmp_path / "run").exists()


LAYOUTS = [
    ("missing", lambda p: None, "imagefolder", ["does not exist"]),
    ("a file", lambda p: p.write_text("x"), "imagefolder", ["is a file"]),
    ("a CIFAR folder as imagefolder", fake_cifar, "imagefolder", ["cifar-10-batches-py/", "--dataset cifar10"]),
    ("an ImageFolder as cifar10", lambda p: imagefolder(p, ("train", "test")), "cifar10",
     ["no cifar-10-batches-py/", "--dataset imagefolder"]),
    ("an ImageFolder as the sample", imagefolder, "sample", ["--data-dir", "--dataset imagefolder"]),
    ("a CIFAR folder as the sample", fake_cifar, "sample", ["--dataset cifar10"]),
]


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("name, make, dataset, needles", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_data_folder_of_another_layout(workdir, tmp_path, command, name, make, dataset, needles):
    root = tmp_path / "data"
    make(root)
    one_line(invoke(*folder_commands(root, workdir, tmp_path, dataset)[command]), *needles)
    if dataset == "cifar10":
        assert sorted(p.name for p in root.iterdir()) == ["test", "train"]  # nothing downloaded into it


def _batch_file(root: Path, name: str) -> Path:
    return root / "cifar-10-batches-py" / name


CIFAR_CASES = [
    ("a batch without data", "test_batch", {"labels": [1, 2]}, "not a CIFAR batch"),
    ("int64 pixels", "test_batch", {"data": np.zeros((2, 3072), np.int64), "labels": [1, 2]}, "uint8"),
    ("pixels of another shape", "test_batch", {"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, "3072"),
    ("fewer labels than images", "test_batch", {"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "labels"),
    ("labels out of range", "test_batch", {"data": np.zeros((2, 3072), np.uint8), "labels": [1, 10]}, "0..9"),
    ("text labels", "test_batch", {"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "labels"),
    ("a list, not a dict", "test_batch", [1, 2], "no dict"),
    ("meta without names", "batches.meta", {"names": ["a"]}, "class names"),
    ("meta with one name", "batches.meta", {"label_names": ["a"]}, "class names"),
    ("a foreign pickle", "test_batch", {"data": Path("x")}, "not allowed"),
    ("missing", "test_batch", None, "is missing"),
]


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("name, file, content, needle", CIFAR_CASES, ids=[c[0] for c in CIFAR_CASES])
def test_bad_cifar_folder(workdir, tmp_path, command, name, file, content, needle):
    root = fake_cifar(tmp_path / "data")
    if content is None:
        _batch_file(root, file).unlink()
    else:
        _batch_file(root, file).write_bytes(pickle.dumps(content))
    one_line(invoke(*folder_commands(root, workdir, tmp_path, "cifar10")[command]), file, needle)


@pytest.mark.parametrize("error", [OSError("no network"), RuntimeError("File not found or corrupted."),
                                   KeyboardInterrupt()])
def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, error):
    import torchvision.datasets.utils as tv_utils

    def partial(url, root, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"half an archive")
        (Path(root) / "cifar-10-batches-py").mkdir()
        raise error

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", partial)
    fresh = tmp_path / "new" / "data"  # two folders the download creates
    mine = tmp_path / "mine"  # a folder of the user's, with a file of theirs
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for root in (fresh, mine):
        if isinstance(error, KeyboardInterrupt):
            with pytest.raises(KeyboardInterrupt):
                datasets.load_split("cifar10", "train", root)
        else:
            one_line(invoke("train", "--dataset", "cifar10", "--data-dir", root, *TINY,
                            "--out", tmp_path / "runs" / root.name), "could not be downloaded", "--data-dir")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "runs") == ["mine"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


NAMES = st.sampled_from(["cat", "dog", "ship", ".hidden"])


@settings(FUZZ, max_examples=25)
@given(tree=st.dictionaries(st.sampled_from(["train", "val", "test"]),
                            st.dictionaries(NAMES, st.integers(0, 2), max_size=3), max_size=3))
def test_generated_imagefolders_load_or_fail_in_one_line(tree):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for split, classes in tree.items():
            (root / split).mkdir()
            for cls, count in classes.items():
                write_images(root / split / cls, count, size=(4, 4))
        loaded = {}
        for split in ("train", "test"):
            try:
                loaded[split] = datasets.load_split("imagefolder", split, root, (3, 8, 8), workers=1)
            except (ValueError, FileNotFoundError) as err:
                assert str(root) in str(err) and "\n" not in str(err), str(err)
        for data in loaded.values():  # accepted: at least two classes, each with an image
            assert len(data.classes) >= 2 and set(data.labels.tolist()) == set(range(len(data.classes)))
        if len(loaded) == 2:
            assert loaded["train"].classes == loaded["test"].classes


# --- output paths and images ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["visualize", "eval", "export", "train"])
def test_out_under_a_file_names_the_path(workdir, tmp_path, command):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    args = {
        "visualize": ["visualize", workdir / "images" / "0.png", "--checkpoint", workdir / "good.safetensors",
                      "--device", "cpu", "--out", out / "grid.png"],
        "eval": ["eval", workdir / "good.safetensors", "--dataset", "imagefolder", "--data-dir", workdir / "data",
                 "--device", "cpu", "--out", out / "c.png"],
        "export": ["export", workdir / "good.safetensors", "--format", "safetensors", "--out", out / "export"],
        "train": ["train", *TINY, "--out", out / "run"],
    }[command]
    error = one_line(invoke(*args), out)
    assert "Errno" not in error and ".tmp" not in error


def test_unwritable_out_names_the_path_given(workdir):
    error = one_line(invoke("visualize", workdir / "images" / "0.png", "--checkpoint", workdir / "good.safetensors",
                            "--device", "cpu", "--out", "/proc/grid.png"), "/proc/grid.png")
    assert ".tmp" not in error and "Errno" not in error


def test_a_folder_given_as_an_image(workdir):
    error = one_line(invoke("visualize", workdir / "images", "--checkpoint", workdir / "good.safetensors",
                            "--device", "cpu"), "images")
    assert "does not exist" not in error


def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path):
    root = imagefolder(tmp_path / "data", per_class=2)
    (root / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one_line(invoke("train", "--dataset", "imagefolder", "--data-dir", root, *TINY, "--out", tmp_path / "run"),
             "broken.png")
    assert not (tmp_path / "run").exists()


def test_plain_state_dict_with_nan_for_visualize_model(workdir, tmp_path):
    state = create_model("all-cnn-c").state_dict()  # a plain state dict of the net --model builds
    state[WEIGHT] = torch.full_like(state[WEIGHT], float("nan"))
    save_file(state, str(tmp_path / "plain.safetensors"))
    one_line(invoke("visualize", workdir / "images" / "0.png", "--model", "all-cnn-c", "--checkpoint",
                    tmp_path / "plain.safetensors", "--device", "cpu", "--out", tmp_path / "grid.png"),
             "plain.safetensors", WEIGHT, "NaN or infinite")
