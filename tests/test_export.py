import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from allconv_cli import __version__
from allconv_cli import export as export_lib
from allconv_cli.cli import app
from allconv_cli.data.preprocess import fit_zca
from allconv_cli.files.weights import load_model, save_weights
from allconv_cli.models import create_model

runner = CliRunner()
CLASSES = ["cat", "dog", "ship", "frog"]
STANDARDIZE = {"kind": "standardize", "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


def make_run(folder, preprocess=STANDARDIZE, tensors=None, in_chans=3, size=32, batch_norm=False):
    """A run folder holding a random-weight all-cnn-c (4 classes) as training would save it."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "in_chans": in_chans, "batch_norm": batch_norm}
    model = create_model("all-cnn-c", **kwargs)
    meta = {"model": "all_cnn_c", "model_kwargs": kwargs,
            "classes": CLASSES, "input_size": [in_chans, size, size], "preprocess": preprocess}
    save_weights(folder / "model.safetensors", model, meta, preprocess=tensors)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


def export_json(*args) -> dict:
    result = runner.invoke(app, ["export", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def fails_in_one_line(*args) -> str:
    result = runner.invoke(app, ["export", *map(str, args)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def batches(channels=3, size=32):
    """Inputs unlike the export's own check (its are preprocessed uniform images): batch 1 and 3."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, channels, size, size, generator=generator) for batch in (1, 3)]


def pytorch(run, x):
    model, _, _ = load_model(run)
    with torch.no_grad():
        return model(x)


def shift_the_reference(monkeypatch):
    """Move the PyTorch outputs that exports are checked against: a right export must now fail."""
    reference = export_lib._reference_outputs
    monkeypatch.setattr(export_lib, "_reference_outputs",
                        lambda model, inputs: [y + 0.5 for y in reference(model, inputs)])


@pytest.fixture(scope="module")
def onnx_fp32(run, tmp_path_factory):
    """(the fp32 ONNX export, its JSON result): every ONNX export costs ~3 s, so one for all."""
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    return out, export_json(run, "--format", "onnx", "--out", out)


def test_onnx_is_one_file_with_dynamic_batch_and_metadata(run, onnx_fp32):
    out, result = onnx_fp32
    assert result["verified_with"].startswith("onnx.checker + onnxruntime")
    assert result["max_abs_diff"] <= result["tolerance"] == pytest.approx(1e-4 * result["output_scale"])
    assert result["batch_sizes"] == [1, 3] and result["size"] == out.stat().st_size
    assert os.listdir(out.parent) == ["m.onnx"]  # no external-data side-file, no temporary left
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model"] == "all_cnn_c" and props["allconv_version"] == __version__
    assert json.loads(props["classes"]) == CLASSES
    assert json.loads(props["input_size"]) == [3, 32, 32]
    assert json.loads(props["preprocess"]) == STANDARDIZE
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic axis
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for x in batches():
        (logits,) = session.run(None, {"input": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), pytorch(run, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, elem_type, runtime", [
    ("fp16", onnx.TensorProto.FLOAT16, "onnxruntime"),
    ("bf16", onnx.TensorProto.BFLOAT16, "onnx.reference"),  # onnxruntime's CPU has no bf16 Conv
])
def test_onnx_half_precision(run, tmp_path, dtype, elem_type, runtime):
    if dtype == "bf16":  # BatchNorm in bf16 is where torch's ONNX optimizer breaks the graph
        run = make_run(tmp_path / "bn", batch_norm=True)
    out = tmp_path / f"{dtype}.onnx"
    result = export_json(run, "--format", "onnx", "--dtype", dtype, "--out", out)
    assert runtime in result["verified_with"]
    assert result["max_abs_diff"] <= result["tolerance"]
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == elem_type
    assert {p.key: p.value for p in proto.metadata_props}["dtype"] == dtype
    if dtype == "fp16":
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        for x in batches():
            (logits,) = session.run(None, {"input": x.numpy().astype(np.float16)})
            expected = pytorch(run, x)
            assert (torch.from_numpy(logits).float() - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_onnx_without_onnxruntime_uses_the_reference_evaluator(run, onnx_fp32, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    run_export, verified_with = export_lib._onnx_runner(onnx_fp32[0], "fp32")
    assert verified_with.startswith("onnx.checker + onnx.reference")
    for x in batches():
        torch.testing.assert_close(run_export(x), pytorch(run, x), rtol=1e-4, atol=1e-5)


def test_onnx_needs_its_extra(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    line = fails_in_one_line(run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    # a pipx install has no pip of its own to give an extra to: both commands, by package name
    assert "pipx inject allconv onnx onnxscript onnxruntime" in line
    assert "pip install onnx onnxscript onnxruntime" in line
    assert not os.listdir(tmp_path)


def test_onnx_packages_are_dependencies():
    import re
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = {re.match(r"[A-Za-z0-9_.-]+", requirement).group() for requirement in project["dependencies"]}
    assert set(export_lib.ONNX_PACKAGES.split()) <= names  # so `pipx install .` can export to onnx


@pytest.mark.parametrize("fmt", export_lib.FORMATS)
def test_a_full_disk_is_refused_before_writing(run, tmp_path, monkeypatch, fmt):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(export_lib.shutil, "disk_usage", lambda path: usage._replace(free=2_000_000))
    line = fails_in_one_line(run, "--format", fmt, "--out", tmp_path / "out" / f"m.{fmt}")
    # all-cnn-c with 4 classes: 5.5 MB of fp32 weights, plus 1 MiB for the graph and metadata
    assert "not enough space" in line and "needs about 6.5 MB" in line and "2.0 MB free" in line
    assert not os.listdir(tmp_path)


def test_default_out_of_a_loose_file_or_the_bundled_weights_is_the_current_directory(tmp_path, monkeypatch):
    from allconv_cli.models import BUNDLED_WEIGHTS

    monkeypatch.chdir(tmp_path)
    assert export_lib.default_out(BUNDLED_WEIGHTS, BUNDLED_WEIGHTS, "onnx") == Path("all-cnn-c-cifar10.onnx")
    loose = make_run(tmp_path / "downloads") / "model.safetensors"
    loose.rename(tmp_path / "downloads" / "mine.safetensors")
    before = sorted(os.listdir(tmp_path / "downloads"))
    result = export_json(tmp_path / "downloads" / "mine.safetensors", "--format", "pt2")
    assert result["path"] == "mine.pt2" and (tmp_path / "mine.pt2").is_file()
    assert sorted(os.listdir(tmp_path / "downloads")) == before


def test_pt2_round_trip_with_metadata(run, tmp_path):
    out = tmp_path / "m.pt2"
    result = export_json(run, "--format", "pt2", "--out", out)
    assert result["verified_with"] == "torch.export.load(...).module()"
    assert os.listdir(tmp_path) == ["m.pt2"]
    extra = {export_lib.PT2_META: ""}
    module = torch.export.load(out, extra_files=extra).module()  # our own file, just written
    meta = json.loads(extra[export_lib.PT2_META])
    assert meta["classes"] == CLASSES and meta["preprocess"] == STANDARDIZE and meta["dtype"] == "fp32"
    for x in batches():
        torch.testing.assert_close(module(x), pytorch(run, x))


def test_safetensors_folder_loads_in_timm(run, tmp_path):
    out = tmp_path / "timm"
    result = export_json(run, "--format", "safetensors", "--out", out)
    assert result["verified_with"].startswith("timm.create_model")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    for x in batches():
        with torch.no_grad():
            torch.testing.assert_close(model(x), pytorch(run, x))
    cfg = model.pretrained_cfg
    assert list(cfg["label_names"]) == CLASSES and cfg["num_classes"] == 4
    data = timm.data.resolve_data_config({}, model=model)  # what timm's tools feed the model
    assert data["input_size"] == (3, 32, 32)
    assert list(data["mean"]) == STANDARDIZE["mean"] and list(data["std"]) == STANDARDIZE["std"]


def test_fp16_safetensors_folder(run, tmp_path):
    out = tmp_path / "timm16"
    result = export_json(run, "--format", "safetensors", "--dtype", "fp16", "--out", out)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    assert 0 < result["max_abs_diff"] <= result["tolerance"] == pytest.approx(1e-2 * result["output_scale"])


def test_zca_checkpoint_exports_with_a_warning(tmp_path):
    zca = fit_zca(torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    settings, tensors = zca.to_meta()
    run = make_run(tmp_path / "run", settings, tensors, in_chans=1, size=16)
    result = runner.invoke(app, ["export", str(run), "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "ZCA" in warnings[0]
    out = run / "export-safetensors"
    config = json.loads((out / "config.json").read_text())
    assert config["allconv"]["preprocess"] == settings
    assert config["pretrained_cfg"]["mean"] == [0.0] and config["pretrained_cfg"]["std"] == [1.0]
    assert torch.equal(load_file(out / "preprocess.safetensors")["zca_matrix"], tensors["zca_matrix"])
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pytorch(run, x))
    result = runner.invoke(app, ["export", str(run), "--format", "pt2"])
    assert result.exit_code == 0, result.output
    assert "Warning: the pt2 export expects GCN + ZCA-whitened input" in result.output


def test_default_outputs_and_force(tmp_path):
    run = make_run(tmp_path / "run")
    export_json(run, "--format", "pt2")
    pt2 = run / "model.pt2"
    assert "--force" in fails_in_one_line(run, "--format", "pt2")
    pt2.write_bytes(b"not an export")
    export_json(run, "--format", "pt2", "--force")
    torch.export.load(pt2)  # the garbage was replaced by a loadable program
    assert sorted(p.name for p in run.iterdir()) == ["model.pt2", "model.safetensors"]


def test_force_replaces_only_an_earlier_export_folder(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    folder = run / "export-safetensors"
    export_json(run / "model.safetensors", "--format", "safetensors")  # a checkpoint file works too
    (folder / "stale.txt").write_text("from an earlier export")
    export_json(run, "--format", "safetensors", "--force")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    shift_the_reference(monkeypatch)
    assert "differs" in fails_in_one_line(run, "--format", "safetensors", "--force")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old export, untouched
    assert sorted(p.name for p in run.iterdir()) == ["export-safetensors", "model.safetensors"]

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"")
    assert "not an allconv safetensors export" in fails_in_one_line(
        run, "--format", "safetensors", "--out", other, "--force")
    assert os.listdir(other) == ["cat.jpg"]  # --force never deletes a folder it did not write


@pytest.mark.parametrize("case, expected", [
    ("format", "unknown format 'tflite': use --format onnx, pt2, safetensors"),
    ("dtype", "unknown dtype 'int8': use --dtype fp32, fp16, bf16"),
    ("no weights", "no checkpoint at"),
    ("exists", "already exists: pass --force"),
    ("under a file", "is not a writable folder; choose another --out"),
])
def test_bad_input_is_one_line(run, tmp_path, case, expected):
    args = {"format": [run, "--format", "tflite"],
            "dtype": [run, "--format", "onnx", "--dtype", "int8"],
            "no weights": [tmp_path, "--format", "onnx"],
            "exists": [run, "--format", "onnx", "--out", tmp_path / "taken.onnx"],
            "under a file": [run, "--format", "onnx", "--out", tmp_path / "taken.onnx" / "m.onnx"]}[case]
    (tmp_path / "taken.onnx").write_bytes(b"someone else's file")
    assert expected in fails_in_one_line(*args)
    assert os.listdir(tmp_path) == ["taken.onnx"]
    assert (tmp_path / "taken.onnx").read_bytes() == b"someone else's file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_is_refused(run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "not a writable folder" in fails_in_one_line(run, "--format", "pt2", "--out", locked / "m.pt2")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("fmt", ["pt2", "safetensors"])  # onnx is written and checked as pt2 is
def test_verification_failure_keeps_nothing(run, tmp_path, monkeypatch, fmt):
    shift_the_reference(monkeypatch)
    out = tmp_path / "out"
    line = fails_in_one_line(run, "--format", fmt, "--out", out)
    assert f"the {fmt} export differs from the PyTorch model by" in line and "nothing was written" in line
    assert not os.listdir(tmp_path)  # no temporary file or folder left either
