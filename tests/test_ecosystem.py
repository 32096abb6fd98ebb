"""What a user expects around the commands: timm's pretrained and features_only calls, output
that reads well in a file, progress only where someone watches, and no writes where the user
did not ask (the installed package, a folder that is not a run folder)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.evaluate import evaluate_checkpoint
from allconv_cli.files.weights import load_model, save_weights
from allconv_cli.models import BUNDLED_WEIGHTS, CIFAR10_CLASSES, create_model

ALLCONV = str(Path(sys.executable).parent / "allconv")
runner = CliRunner()
# 64 of the bundled sample's test images: a second or two on two CPU cores
QUICK_EVAL = ["--dataset", "sample", "--limit", "64", "--batch-size", "32", "--device", "cpu"]


def make_run(folder: Path) -> Path:
    """A run folder as training leaves it (weights only here), of a random-weight model-c."""
    torch.manual_seed(0)
    model = create_model("model-c")
    meta = {"model": "model_c", "model_kwargs": {"num_classes": 10}, "dataset": "sample",
            "classes": list(CIFAR10_CLASSES), "input_size": [3, 32, 32],
            "preprocess": {"kind": "standardize", "mean": [0.5] * 3, "std": [0.25] * 3}}
    save_weights(folder / "model.safetensors", model, meta)
    return folder


def listing(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_timm_pretrained_is_the_bundled_checkpoint():
    bundled, meta, _ = load_model(BUNDLED_WEIGHTS)
    model = timm.create_model("all_cnn_c_bn", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), bundled(x))
    data = timm.data.resolve_data_config({}, model=model)
    assert list(data["mean"]) == meta["preprocess"]["mean"] and list(data["std"]) == meta["preprocess"]["std"]
    assert list(data["input_size"]) == meta["input_size"]
    assert list(model.pretrained_cfg["label_names"]) == meta["classes"]
    assert "all_cnn_c_bn.cifar10" in timm.list_models(pretrained=True)


def test_timm_features_only_on_the_pretrained_weights():
    features = timm.create_model("all_cnn_c_bn", pretrained=True, features_only=True).eval()
    full = timm.create_model("all_cnn_c_bn", pretrained=True).eval()
    seen = {}
    full.get_layer("conv8").register_forward_hook(lambda m, i, o: seen.update(conv8=o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = features(x)
        full(x)
    # conv2, conv5, conv6 (stride 2), conv8 (after the valid 3x3 conv shrank 8x8 to 6x6)
    assert [tuple(m.shape[1:]) for m in maps] == [(96, 32, 32), (192, 16, 16), (192, 8, 8), (192, 6, 6)]
    assert features.feature_info.reduction() == [1, 2, 4, 4]
    torch.testing.assert_close(maps[-1], seen["conv8"])


def test_eval_of_a_checkpoint_in_a_read_only_folder_writes_elsewhere(tmp_path, monkeypatch):
    locked = tmp_path / "downloads"
    locked.mkdir()
    shutil.copy(BUNDLED_WEIGHTS, locked / "weights.safetensors")
    locked.chmod(0o555)  # root writes anyway: the rule, not the mode, has to keep it clean
    before = listing(locked)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    try:
        result = runner.invoke(app, ["eval", str(locked / "weights.safetensors"), *QUICK_EVAL, "--json"])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 0, result.output
    assert listing(locked) == before
    assert json.loads(result.stdout)["confusion_png"] == "confusion-sample-test.png"
    assert (work / "confusion-sample-test.png").stat().st_size > 0


def test_eval_of_the_bundled_weights_never_writes_into_the_package(tmp_path, monkeypatch):
    assets = BUNDLED_WEIGHTS.parent
    before = listing(assets)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(BUNDLED_WEIGHTS), *QUICK_EVAL])
    assert result.exit_code == 0, result.output
    assert listing(assets) == before
    assert os.listdir(tmp_path) == ["confusion-sample-test.png"]


def test_eval_of_a_run_folder_writes_into_it(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(run / "model.safetensors"), *QUICK_EVAL, "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(run)) == ["confusion-sample-test.png", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert "fp32" in result.stdout


def test_eval_piped_to_a_file_keeps_every_line_whole(tmp_path):
    out = tmp_path / ("a-folder-name-long-enough-that-the-path-passes-eighty-columns-" * 2) / "confusion.png"
    with open(tmp_path / "stdout.txt", "w") as stdout:
        done = subprocess.run([ALLCONV, "eval", str(BUNDLED_WEIGHTS), *QUICK_EVAL, "--out", str(out)],
                              stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar when stderr is not a terminal
    text = (tmp_path / "stdout.txt").read_text()
    assert f"confusion matrix: {out}\n" in text
    assert "all-cnn-c-bn (epoch 8) on sample test, 64 images, " in text  # the bundled network, named as built


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_progress_goes_to_a_terminal_stderr_unless_quiet(quiet, tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the captured streams as a terminal
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(BUNDLED_WEIGHTS), *QUICK_EVAL, "--json"]
                           + (["--quiet"] if quiet else []))
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # stdout holds only the JSON, progress or not
    assert ("evaluating" in result.stderr) is not quiet


def test_evaluate_reports_each_batch():
    calls = []
    evaluate_checkpoint(BUNDLED_WEIGHTS, "sample", limit=70, batch_size=32, device="cpu",
                        progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
