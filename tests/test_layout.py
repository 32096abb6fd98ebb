"""The package's layout: imports between allconv_cli's modules form no cycle, the library
imports our own modules at the top of a file, never inside a function (an import hidden in a
function is how a cycle hides), and no library function runs past 60 lines; and the one order in
which a run's network options are resolved, on every registry row and preset."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.data.sources import DATA_SOURCES, DataSource
from allconv_cli.data.splits import ImageData
from allconv_cli.models.registry import MODEL_OPTIONS, NETWORKS
from allconv_cli.train.config import TrainConfig, list_presets
from allconv_cli.train.settings import from_json, model_kwargs, read_preset, resolve

PACKAGE = Path(__file__).resolve().parents[1] / "allconv_cli"

# Imports inside library functions that are allowed, each for a reason: (module, imported).
FUNCTION_IMPORTS_ALLOWED = {
    # onnx, onnxscript and onnxruntime take seconds to import and serve one export format only
    ("allconv_cli.export", "onnx"),
    ("allconv_cli.export", "onnxruntime"),
    ("allconv_cli.export", "ml_dtypes"),  # comes with onnx; only bf16 ONNX checks need it
    # matplotlib takes about a second to import; only the saliency figures need it
    ("allconv_cli.explain.figures", "matplotlib"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def is_library(name: str) -> bool:
    """The CLI imports torch and the library inside command bodies on purpose (a fast --help)."""
    return not (name == "allconv_cli.cli" or name.startswith("allconv_cli.cli."))


def imported(node: ast.AST, importer: str, known: set[str]) -> list[str]:
    """Our modules an import statement loads (``from allconv_cli.data import datasets`` loads both)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return []
    found = []
    for name in names:
        if name in known:
            found.append(name)
    return [n for n in found if n.startswith("allconv_cli.") and n != importer]


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    edges = {}
    for name, tree in trees.items():
        targets = set()
        for node in ast.walk(tree):
            targets.update(imported(node, name, known))
        # a package's __init__ runs on importing any module below it: depend on it too
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    return edges


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_library_imports_at_the_top():
    hidden = []
    for name, tree in modules().items():
        if not is_library(name):
            continue
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if module.startswith("allconv_cli") or (name, module.split(".")[0]) not in FUNCTION_IMPORTS_ALLOWED:
                        hidden.append(f"{name}.{function.name}: import {module}")
    assert not hidden, "imports inside library functions: " + "; ".join(hidden)


LONGEST_FUNCTION = 60  # lines of a library function from its def to its last line, signature and docstring counted


def test_no_long_library_function():
    long = []
    for name, tree in modules().items():
        if not is_library(name):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert not long, "library functions over 60 lines: " + ", ".join(long)


# The network a run builds, in the order settings.network_options states: the options given,
# then the row of a model given, then a preset's keys, then the row of the preset's model, then
# the recipe (TrainConfig's defaults). Every registry row under every preset, and without one.
@pytest.mark.parametrize("preset, model", [(preset, model) for preset in (None, *list_presets())
                                           for model in (None, *NETWORKS)])
def test_network_options_follow_one_order(preset, model):
    stated = read_preset(preset) if preset else {}
    preset_model = stated.get("model", "all-cnn-c").replace("-", "_")
    recipe = {key: getattr(TrainConfig(), key) for key in MODEL_OPTIONS}
    # sgd and the sample: a network without BatchNorm and a 224-pixel one resolve as well
    given = {"optimizer": "sgd", "dataset": "sample", **({"model": model} if model else {})}
    for extra in ({}, {"drop_rate": 0.3}):
        sources = [extra, NETWORKS[model].options if model else {}, stated, NETWORKS[preset_model].options, recipe]
        expected = {key: next(s[key] for s in sources if key in s) for key in MODEL_OPTIONS}
        config = resolve(preset, **given, **extra)
        assert model_kwargs(config, 10) == {"num_classes": 10, **expected}
        assert {key: getattr(config, key) for key in MODEL_OPTIONS} == expected  # the saved settings say it too
        assert model_kwargs(from_json(config.to_json()), 10) == model_kwargs(config, 10)  # resumed alike


# A new data source is one entry of DATA_SOURCES and its loader: here a folder of IDX files (the
# MNIST format), registered as a user's extension would be, reaches every command that reads data.
def _write_idx(path: Path, array: np.ndarray):
    """An IDX file of uint8 values: magic (0, 0, 8 = ubyte, dimensions), the sizes, the bytes."""
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
                     + array.astype(np.uint8).tobytes())


def _read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(shape)


def load_idx(name, split, data_dir, input_size, workers, fit) -> ImageData:
    """28x28 grey digits -> uint8 (N, C, H, W) at the model's input size."""
    prefix = Path(data_dir) / ("train" if split == "train" else "t10k")
    grey = torch.from_numpy(_read_idx(Path(f"{prefix}-images-idx3-ubyte")).copy()).float()[:, None]
    images = F.interpolate(grey, size=tuple(input_size[1:]), mode="bilinear").round().clamp(0, 255)
    labels = torch.from_numpy(_read_idx(Path(f"{prefix}-labels-idx1-ubyte")).astype(np.int64))
    return ImageData(images.expand(-1, input_size[0], -1, -1).to(torch.uint8).contiguous(), labels, ["0", "1", "2"])


IDX = DataSource(f"{__name__}:load_idx", "digits in IDX files", "train- and t10k-images-idx3-ubyte with their labels",
                 "train: train-*; test: t10k-*", 3)


def test_a_new_data_source_is_one_entry_and_reaches_every_command(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 24), ("t10k", 12)):
        labels = np.arange(count) % 3
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 80, (count, 28, 28)) + 80 * labels[:, None, None])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels)
    monkeypatch.setitem(DATA_SOURCES, "idx", IDX)
    run, data = tmp_path / "run", ["--data-dir", str(tmp_path)]
    commands = [["train", "--dataset", "idx", *data, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--out", str(run)],
                ["eval", str(run), "--out", str(tmp_path / "confusion.png")],
                ["visualize", "--dataset", "idx", *data, "--checkpoint", str(run), "--layer", "conv6", "--channel", "0",
                 "--top", "2", "--device", "cpu", "--out", str(tmp_path / "grid.png")],
                ["faithfulness", "--dataset", "idx", *data, "--checkpoint", str(run), "--limit", "2", "--methods",
                 "guided,random", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "faithfulness.png")]]
    for command in commands:
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, f"{command[0]}: {result.output}"
    assert (tmp_path / "faithfulness.png").is_file() and (tmp_path / "grid.png").is_file()
    # the help is written when the commands are defined: a source registered before then is listed
    script = ("from allconv_cli.data.sources import DATA_SOURCES, DataSource; "
              "DATA_SOURCES['idx'] = DataSource('os:getcwd', 'digits in IDX files', '', '', 3); "
              "from typer.testing import CliRunner; from allconv_cli.cli import app; "
              "print(*(CliRunner().invoke(app, [c, '--help']).output for c in "
              "('train', 'visualize', 'faithfulness')))")
    helped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    assert helped.returncode == 0, helped.stderr
    shown = helped.stdout
    shown = " ".join(shown.replace("│", " ").split())  # the words, wherever rich wrapped them
    assert "idx: digits in IDX files" in shown and shown.count(", idx") == 2
