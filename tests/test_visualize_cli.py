"""``allconv visualize`` end to end through CliRunner, on a tiny checkpoint and 16x16 images."""

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.explain import figures, maps
from allconv_cli.explain.methods import METHODS, SALIENCY_METHODS, Method, Setting
from allconv_cli.files import loading
from allconv_cli.files.raw_maps import read_raw_maps
from allconv_cli.files.weights import save_weights
from allconv_cli.models import create_model

runner = CliRunner()
CLASSES = ["cat", "dog", "ship"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 3-class All-CNN-C checkpoint for 16x16 input and two images of other sizes."""
    folder = tmp_path_factory.mktemp("visualize")
    torch.manual_seed(0)
    model = create_model("all-cnn-c", num_classes=3)
    meta = {"model": "all_cnn_c", "model_kwargs": {"num_classes": 3}, "classes": CLASSES,
            "input_size": [3, 16, 16],
            "preprocess": {"kind": "standardize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    save_weights(folder / "run" / "model.safetensors", model, meta)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 24), dtype=np.uint8), "L").save(folder / "b.jpg")
    return folder


def visualize(workdir, *args):
    return runner.invoke(app, ["visualize", *args, "--checkpoint", str(workdir / "run"), "--device", "cpu"])


def test_writes_the_grid_and_raw_maps(workdir, tmp_path):
    out, raw = tmp_path / "grid.png", tmp_path / "maps.safetensors"
    result = visualize(workdir, str(workdir / "a.png"), str(workdir / "b.jpg"), "--layer", "conv6",
                       "--out", str(out), "--raw", str(raw))
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("a.png: conv6 channel ") and lines[1].startswith("b.jpg: conv6 channel ")
    assert lines[-1] == f"wrote {out} and {raw}"
    assert out.stat().st_size > 0
    with Image.open(out) as png:
        png.load()
        assert png.format == "PNG" and png.width > 4 * 64 and png.height > 2 * 64
    with safe_open(str(raw), "pt") as f:
        assert sorted(f.keys()) == ["image", "input", "maps.backprop", "maps.deconvnet", "maps.guided", "targets"]
    written = read_raw_maps(raw)  # the format's own reader checks what the writer wrote
    assert written.kind == "saliency" and written.maps["guided"].shape == (2, 3, 16, 16)
    assert written.tensors["input"].shape == (2, 3, 16, 16)
    assert written.meta["layer"] == "conv6" and written.meta["methods"] == ["backprop", "deconvnet", "guided"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "maps.safetensors"]  # no temporaries


def test_class_gradcam_and_every_neuron_mode(workdir, tmp_path):
    image = str(workdir / "a.png")
    cases = [
        (["--class", "dog", "--methods", "guided,gradcam,guided-gradcam", "--layer", "conv8"],
         ["a.png: dog (1), logit "]),
        (["--class", "predicted", "--methods", "gradcam"], ["a.png: "]),
        (["--neuron", "5", "1", "2", "--layer", "conv6"], ["a.png: conv6 channel 5 at (1, 2)"]),
        (["--channel", "3", "--channel", "9", "--layer", "conv5"],
         ["a.png: conv5 channel 3 at", "a.png: conv5 channel 9 at"]),
        (["--top-channels", "2", "--norm", "abs", "--upscale", "bicubic"], ["a.png: conv9", "a.png: conv9"]),
        (["--norm", "percentile", "--percentile", "90"], ["a.png: conv9"]),
    ]
    for n, (args, starts) in enumerate(cases):
        out = tmp_path / f"{n}.png"
        result = visualize(workdir, image, *args, "--out", str(out))
        assert result.exit_code == 0, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == len(starts) + 1, (args, lines)
        assert all(line.startswith(start) for line, start in zip(lines, starts)), (args, lines)
        with Image.open(out) as png:
            assert png.format == "PNG"


def _fake_split(calls):
    """load_split's stand-in: 12 random 16x16 images, and a record of what was asked for."""
    from allconv_cli.data.splits import ImageData

    def load_split(name, split, data_dir, input_size, fit):
        assert fit == ("bilinear", 1.0)  # the model's registered fitting
        calls.append((name, data_dir, split, tuple(input_size)))
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator)
        return ImageData(images, torch.zeros(12, dtype=torch.long), ["a"])

    return load_split


def test_the_dataset_scan(workdir, tmp_path, monkeypatch):
    from allconv_cli.data import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_split", _fake_split(calls))
    out, raw = tmp_path / "fig3.png", tmp_path / "fig3.safetensors"
    result = visualize(workdir, "--dataset", "cifar10", "--data-dir", "data", "--layer", "conv6",
                       "--channel", "2", "--channel", "7", "--top", "4", "--out", str(out), "--raw", str(raw))
    assert result.exit_code == 0, result.output
    assert calls == [("cifar10", "data", "test", (3, 16, 16))]
    assert result.output.splitlines()[0].startswith("conv6 filter 2: top activation ")
    assert "scanning" not in result.output  # no progress bar: stderr is not a terminal here
    with Image.open(out) as png:
        assert png.format == "PNG"
    written = read_raw_maps(raw)
    assert written.kind == "patches" and written.meta["layer"] == "conv6"
    assert written.tensors["patches"].shape == (2, 4, 3, 19, 19)
    assert written.maps["guided"].shape == (2, 4, 3, 19, 19)


@pytest.mark.parametrize("top", ["0", "13", "1000000000"])
def test_top_is_bounded_by_the_split(workdir, tmp_path, monkeypatch, top):
    from allconv_cli.data import datasets

    monkeypatch.setattr(datasets, "load_split", _fake_split([]))
    result = visualize(workdir, "--dataset", "cifar10", "--top", top, "--out", str(tmp_path / "fig3.png"))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"Error: --top {top}: cifar10 test has 12 images; give 1 to 12 patches per filter"
    assert not (tmp_path / "fig3.png").exists()


def test_inputs_are_checked_before_the_output(workdir, tmp_path, monkeypatch):
    """A stray grid.png (or sanity/ folder) must not hide an error about an input: a folder given
    as an image is reported first; the existing output is refused once the inputs are good."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "a-conv9.png").write_bytes(b"a former grid")  # visualize's default name: image and layer
    (tmp_path / "sanity").mkdir()
    (tmp_path / "sanity" / "guided.png").write_bytes(b"a former grid")
    for command in ("visualize", "sanity"):
        folder = runner.invoke(app, [command, "photos", "--checkpoint", str(workdir / "run"), "--device", "cpu"])
        assert folder.exit_code == 2, folder.output
        assert folder.output.strip() == "Error: image photos is a folder, not an image file: give the image files in it"
        image = [str(workdir / "a.png"), "--checkpoint", str(workdir / "run"), "--device", "cpu"]
        existing = runner.invoke(app, [command, *image] + (["--methods", "guided"] if command == "sanity" else []))
        assert existing.exit_code == 2 and "already exists: pass --force" in existing.output, existing.output
    assert (tmp_path / "a-conv9.png").read_bytes() == b"a former grid"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a-conv9.png", "guided.png", "photos", "sanity"]


def test_the_scan_progress_bar_on_a_terminal(workdir, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from allconv_cli.cli import common as cli
    from allconv_cli.data import datasets
    from allconv_cli.explain import scan

    monkeypatch.setattr(datasets, "load_split", _fake_split([]))
    stream = io.StringIO()
    monkeypatch.setattr(cli, "make_console", lambda to_stderr: Console(file=stream, force_terminal=to_stderr))
    seen = []
    real = scan.top_patches

    def top_patches(*args, **kwargs):
        return real(*args[:-1], lambda count: (seen.append(count), args[-1](count)), **kwargs)

    monkeypatch.setattr(scan, "top_patches", top_patches)
    result = visualize(workdir, "--dataset", "cifar10", "--layer", "conv6", "--top", "2",
                       "--out", str(tmp_path / "fig3.png"))
    assert result.exit_code == 0, result.output
    assert seen == [12]  # one batch of 256 holds all 12 images
    assert "scanning" in stream.getvalue() and "12/12" in stream.getvalue()


def test_json_and_no_silent_overwrite(workdir, tmp_path):
    out, raw = tmp_path / "grid.png", tmp_path / "maps.safetensors"
    args = [str(workdir / "a.png"), str(workdir / "b.jpg"), "--layer", "conv6", "--out", str(out), "--json"]
    result = visualize(workdir, *args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["out"] == str(out) and report["raw"] is None and report["precision"] == "fp32"
    assert [Path(t["path"]).name for t in report["targets"]] == ["a.png", "b.jpg"]
    first = report["targets"][0]
    assert first["layer"] == "conv6" and first["class"] is None and first["value"] > 0
    before = out.read_bytes()
    again = visualize(workdir, *args)
    assert again.exit_code == 2 and again.output.strip() == (
        f"Error: {out} already exists: pass --force to overwrite it, or choose another --out")
    assert out.read_bytes() == before
    raw.write_bytes(b"earlier maps")
    refused = visualize(workdir, *args[:-3], "--out", str(tmp_path / "new.png"), "--raw", str(raw))
    assert refused.exit_code == 2 and f"{raw} already exists" in refused.output
    assert not (tmp_path / "new.png").exists()
    forced = visualize(workdir, *args, "--class", "ship", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output)["targets"][0]["class"] == "ship (2)"
    assert out.read_bytes() != before


@pytest.mark.parametrize("columns", [1, 2, 5, 12])
def test_the_caption_is_never_cut_off(columns):
    """Every text of the figure lies inside it, for narrow and wide grids and a long caption."""
    from allconv_cli.explain import figures as grid

    cell = np.zeros((32, 32, 3))
    caption = " · ".join(["all-cnn-c, weights /a/rather/long/path/to/a/run/folder/model.safetensors"] * 3
                         + ["signal from the most active neuron of conv9 (the paper's Fig. 4)", "W" * 80])
    figure = grid.grid_figure([[cell] * columns] * 2, ["a-long-image-name.png\nconv9 ch 3 @ (1, 2)", "b.png"],
                              [(f"guided Grad-CAM {i}", 1) for i in range(columns)], caption)
    renderer = figure.canvas.get_renderer()
    width, height = figure.bbox.width, figure.bbox.height
    assert len(figure.texts) == 2 + columns + 1
    for text in figure.texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, (text.get_text(), box)
    shown = figure.texts[-1].get_text()
    assert shown.count("\n") >= (8 if columns == 1 else 1)
    assert shown.replace("\n", "").replace(" ", "") == caption.replace(" ", "")  # nothing dropped


def test_precision_defaults_to_fp32(workdir, tmp_path, monkeypatch):
    from allconv_cli.explain import saliency

    seen = []
    real = saliency.explain

    def explain(*args, **kwargs):
        seen.append(kwargs["precision"])
        result = real(*args, **kwargs)
        seen.append(result.precision)
        return result

    monkeypatch.setattr(saliency, "explain", explain)
    for extra, expected in (([], "fp32"), (["--precision", "bf16"], "bf16")):
        result = visualize(workdir, str(workdir / "a.png"), "--out", str(tmp_path / f"{expected}.png"), *extra)
        assert result.exit_code == 0, result.output
        assert seen[-2:] == [expected, expected]


def test_a_timm_net_from_a_plain_state_dict(tmp_path):
    import timm

    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), str(tmp_path / "resnet18.safetensors"))
    Image.fromarray(np.full((50, 60, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    out = tmp_path / "r.png"
    result = runner.invoke(app, ["visualize", str(tmp_path / "grey.png"), "--model", "resnet18", "--checkpoint",
                                 str(tmp_path / "resnet18.safetensors"), "--methods", "guided", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("grey.png: layer4 channel ")  # timm's last stage by default
    assert out.is_file()


@pytest.mark.skipif(not loading.BUNDLED_CHECKPOINT.is_file(), reason="the bundled All-CNN-C is not in this checkout")
def test_the_bundled_model_out_of_the_box(workdir, tmp_path):
    loaded = loading.load_checkpoint()
    assert loaded.name == "all-cnn-c" and loaded.input_size == (3, 32, 32) and len(loaded.classes) == 10
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["visualize", str(workdir / "a.png"), "--layer", "conv6", "--out", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_normalizations():
    from allconv_cli.explain.figures import normalize

    m = torch.tensor([[[-2.0, 0.0, 1.0, 4.0]]])  # (1, 1, 4)
    signed = normalize(m, "signed")
    assert signed.shape == (1, 4, 3)
    np.testing.assert_allclose(signed[0, :, 0], [0.25, 0.5, 0.625, 1.0])  # 0 is grey, /max|m|
    np.testing.assert_allclose(normalize(m, "abs")[0, :, 0], [0.5, 0.0, 0.25, 1.0])
    clipped = normalize(m, "percentile", 50)[0, :, 0]  # the median of |m| is 1.5
    np.testing.assert_allclose(clipped, [0.0, 0.5, 0.5 + 0.5 / 1.5, 1.0])
    rgb = torch.stack([m[0], -m[0], 0 * m[0]])  # (3, 1, 4): one scale for all colour channels
    np.testing.assert_allclose(normalize(rgb, "signed")[0, 3], [1.0, 0.0, 0.5])


def _bad_files(folder):
    folder.mkdir()
    (folder / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize("case", [
    "missing image", "not an image", "truncated image", "decompression bomb", "unknown layer",
    "unknown method", "gradcam without a class", "unknown class", "two neuron choices", "bad norm",
    "out not png", "no images", "missing bundled weights", "bad channel", "bad precision", "fp16 on the cpu",
    "no top channels", "more top channels than the layer has", "neuron outside the map", "percentile 0",
    "percentile over 100",
])
def test_bad_input_is_one_line_and_no_png(workdir, tmp_path, monkeypatch, case):
    image = str(workdir / "a.png")
    bad = _bad_files(tmp_path / "inputs")
    args, expected = {
        "missing image": ([image, str(bad / "nowhere.jpg")], "nowhere.jpg does not exist"),
        "not an image": ([image, str(bad / "text.png")], "text.png cannot be read"),
        "truncated image": ([str(bad / "cut.png")], "cut.png"),
        "decompression bomb": ([image], "decompression bomb"),
        "unknown layer": ([image, "--layer", "conv66"], "this model has conv1, conv2"),
        "unknown method": ([image, "--methods", "guided,guidded"], "did you mean 'guided'"),
        "gradcam without a class": ([image, "--methods", "gradcam"], "add --class"),
        "unknown class": ([image, "--class", "cta"], "did you mean 'cat'"),
        "two neuron choices": ([image, "--neuron", "1", "1", "1", "--class", "cat"], "--neuron and --class"),
        "bad norm": ([image, "--norm", "log"], "unknown --norm 'log'"),
        "out not png": ([image, "--out", str(tmp_path / "grid.jpg")], "must end in .png"),
        "no images": ([], "give IMAGE files or --dataset"),
        "missing bundled weights": ([image], "give --checkpoint"),
        "bad channel": ([image, "--channel", "500", "--layer", "conv6"], "channel 500 is out of range"),
        "bad precision": ([image, "--precision", "fp8"], "unknown precision 'fp8'"),
        "fp16 on the cpu": ([image, "--precision", "fp16"], "fp16 autocast runs on CUDA only"),
        "no top channels": ([image, "--top-channels", "0"], "--top-channels 0: conv9 has 3 channels; give 1 to 3"),
        "more top channels than the layer has": ([image, "--top-channels", "1000000000"],
                                                 "--top-channels 1000000000: conv9 has 3 channels; give 1 to 3"),
        "neuron outside the map": ([image, "--layer", "conv6", "--neuron", "0", "99", "0"], "neuron y 99 is out of range"),
        "percentile 0": ([image, "--norm", "percentile", "--percentile", "0"], "--percentile 0.0 must be in (0, 100]"),
        "percentile over 100": ([image, "--percentile", "101"], "--percentile 101.0 must be in (0, 100]"),
    }[case]
    if case == "decompression bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    out = tmp_path / "grid.png"
    if case == "missing bundled weights":
        monkeypatch.setattr(loading, "BUNDLED_CHECKPOINT", tmp_path / "absent.safetensors")
        result = runner.invoke(app, ["visualize", *args, "--out", str(out)])
    else:
        result = visualize(workdir, *args, *([] if case == "out not png" else ["--out", str(out)]))
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert [p.name for p in tmp_path.iterdir()] == ["inputs"]  # no PNG, no temporary


def test_the_raw_maps_reader_refuses_other_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    from allconv_cli.files.raw_maps import write_raw_maps

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not an allconv raw-maps file"):
        read_raw_maps(other)
    with pytest.raises(ValueError, match="holds image, input, targets"):
        write_raw_maps(tmp_path / "bad.safetensors", "saliency", {}, {"image": torch.zeros(1)}, {})


def scaled_gradient(model, x, rows, layer, *, gain, jitter, generator):
    """The gradient times ``gain``, plus ``jitter`` times noise from ``generator``: a method with
    settings of its own, one of them a seed."""
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    return gain * maps.backprop(model, x, rows) + jitter * noise


def gradient_magnitude(model, x, rows, layer):
    """Simonyan et al.'s (2014) class saliency map: the largest |gradient| over colour channels."""
    return maps.backprop(model, x, rows).abs().amax(1, keepdim=True)


NEW_METHODS = {
    "scaled-gradient": Method("scaled gradient", scaled_gradient, prefix="scaled", settings=(
        Setting("gain", 1.0, "Factor of the gradient.", 0.0, 100.0),
        Setting("jitter", 0.0, "Noise added, in input units.", 0.0),
        Setting("seed", 0, "Seed of the noise.", 0))),
    "gradient-magnitude": Method("gradient magnitude", gradient_magnitude, needs_class=True, colormap="viridis")}
SETTINGS_OPTIONS = ("--scaled-gain", "--scaled-jitter", "--scaled-seed")


@pytest.fixture
def new_methods(monkeypatch):
    """Two methods the table does not have, each added as one entry (its function defined here)."""
    for name, entry in NEW_METHODS.items():
        monkeypatch.setitem(SALIENCY_METHODS, name, entry)
    return list(NEW_METHODS)


def test_a_new_method_is_one_entry(workdir, tmp_path, new_methods, monkeypatch):
    """Added as entries, two methods (one with settings) are computed, validated, drawn and scored
    by visualize and faithfulness with no other change."""
    out, raw = tmp_path / "grid.png", tmp_path / "maps.safetensors"
    image = str(workdir / "a.png")
    refused = visualize(workdir, image, "--methods", "gradient-magnitude", "--out", str(out))
    assert refused.exit_code == 2 and "gradient-magnitude explain a class score: add --class" in refused.output
    drawn = []

    def render(rows, titles, groups, caption, *rest):
        drawn.append((rows, groups, caption))
        return b"png"

    monkeypatch.setattr(figures, "render", render)
    result = visualize(workdir, image, "--class", "dog", "--methods", ",".join(["guided", *new_methods]),
                       "--scaled-gain", "2", "--out", str(out), "--raw", str(raw), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["scaled-gradient"] == {"gain": 2.0, "jitter": 0.0, "seed": 0}
    written = read_raw_maps(raw)
    assert written.maps["scaled-gradient"].shape == (1, 3, 16, 16)
    assert written.maps["gradient-magnitude"].shape == (1, 1, 16, 16)
    torch.testing.assert_close(written.maps["gradient-magnitude"],
                               written.maps["scaled-gradient"].div(2).abs().amax(1, keepdim=True))
    (cells, *_), groups, caption = drawn[0]
    assert [title for title, _ in groups] == ["input", "guided backprop", "scaled gradient", "gradient magnitude"]
    colours = colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    assert np.abs(cells[3].reshape(-1, 1, 3) - colours[None]).sum(-1).min(1).max() < 0.01  # viridis
    assert "gradient magnitude 0 to max (viridis)" in caption
    scored = runner.invoke(app, ["faithfulness", image, "--checkpoint", str(workdir / "run"), "--device", "cpu",
                                 "--steps", "2", "--json", "--out", str(tmp_path / "chart.png"),
                                 "--scaled-jitter", "0.5", "--scaled-seed", "3"])
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)
    assert [row["method"] for row in report["table"]] == [*METHODS, *new_methods, "random", "sobel"]
    assert len(report["mean_curves"]["gradient-magnitude"]["insertion"]) == 3
    assert report["settings"]["scaled-gradient"] == {"gain": 1.0, "jitter": 0.5, "seed": 3}


def test_a_method_with_settings_in_all_three_commands(workdir, tmp_path, new_methods):
    """The entry's settings are options of visualize, sanity and faithfulness, in their help with
    the entry's text, default and range; checked; refused for a method not chosen; and a seeded
    method's noise is the same at every stage of the sanity check."""
    for command in ("visualize", "sanity", "faithfulness"):
        shown = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})
        assert shown.exit_code == 0
        for option in SETTINGS_OPTIONS:
            assert option in shown.output, (command, option)
        assert "scaled-gradient: Factor of the gradient. Default: 1.0; 0.0 to 100.0." in shown.output
    image = str(workdir / "a.png")
    common = ["--checkpoint", str(workdir / "run"), "--device", "cpu"]
    checked = runner.invoke(app, ["sanity", image, *common, "--methods", "scaled-gradient,guided",
                                  "--scaled-gain", "3", "--scaled-jitter", "0.1", "--out", str(tmp_path / "s"),
                                  "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["settings"]["scaled-gradient"] == {"gain": 3.0, "jitter": 0.1, "seed": 0}
    assert (tmp_path / "s" / "scaled-gradient.png").exists()
    shown = visualize(workdir, image, "--class", "dog", "--methods", "integrated-gradients", "--ig-steps", "4",
                      "--ig-baseline", "mean", "--out", str(tmp_path / "ig.png"))
    assert shown.exit_code == 0, shown.output
    assert "; integrated-gradients: baseline to image " in shown.output and ", completeness error " in shown.output
    for args, message in ((["--methods", "scaled-gradient", "--scaled-gain", "-1"], "--scaled-gain -1.0: give 0.0 "
                                                                                    "to 100.0"),
                          (["--methods", "guided", "--scaled-seed", "2"], "--scaled-seed sets scaled-gradient, "
                                                                          "which is not among the methods")):
        for command in ("visualize", "sanity", "faithfulness"):
            refused = runner.invoke(app, [command, image, *common, *args, "--class", "dog",
                                          "--out", str(tmp_path / ("x.png" if command != "sanity" else "x"))])
            assert refused.exit_code == 2, (command, refused.output)
            assert message in refused.output and "Traceback" not in refused.output


def test_method_options_never_clash(new_methods):
    """Over every entry (the fixture's too) and every command that computes maps: each setting is
    an option of each command, and no option name is declared twice."""
    import typer

    from allconv_cli.explain.methods import setting_options

    options = setting_options()
    assert len(options) == sum(len(entry.settings) for entry in SALIENCY_METHODS.values())
    group = typer.main.get_command(app)
    for name in ("visualize", "sanity", "faithfulness"):
        declared = [flag for param in group.commands[name].params for flag in param.opts + param.secondary_opts]
        assert len(declared) == len(set(declared)), name
        assert set(options) <= set(declared), name


def test_a_clashing_setting_is_refused(monkeypatch):
    """A setting whose option a command already has (--seed of faithfulness) or another entry's."""
    from allconv_cli.explain.methods import setting_options

    monkeypatch.setitem(SALIENCY_METHODS, "clash", Method("clash", gradient_magnitude, prefix="smoothgrad",
                                                          settings=(Setting("seed", 0, "Seed.", 0),)))
    with pytest.raises(ValueError, match="clash and smoothgrad both declare --smoothgrad-seed"):
        setting_options()
    monkeypatch.delitem(SALIENCY_METHODS, "clash")
    monkeypatch.setitem(SALIENCY_METHODS, "batch", Method("batch", gradient_magnitude, settings=(
        Setting("size", 1, "Rows.", 1),)))
    with pytest.raises(ValueError, match="batch's setting size would be --batch-size, which faithfulness already has"):
        runner.invoke(app, ["faithfulness", "--help"])


def test_help_summaries_are_whole_sentences():
    """`allconv --help` lists each command by its docstring's first paragraph: one line of whole
    sentences, shown unbroken. Rich help keeps a docstring's line breaks, so every paragraph but
    the examples is one line."""
    shown = runner.invoke(app, ["--help"], env={"COLUMNS": "2000"})
    assert shown.exit_code == 0, shown.output
    for command in app.registered_commands:
        summary, *rest = inspect.getdoc(command.callback).split("\n\n")
        assert summary.endswith(".") and summary in shown.output, (command.callback.__name__, summary)
        for paragraph in [summary, *rest]:
            assert "\n" not in paragraph or paragraph.startswith("Example"), (command.callback.__name__, paragraph)


def test_a_second_image_or_layer_never_meets_the_first_ones_grid(workdir, tmp_path, monkeypatch):
    """Issue #58: the default grid is named after its image and layer, so no --force is needed."""
    monkeypatch.chdir(tmp_path)
    for args in (["a.png"], ["b.jpg"], ["a.png", "--layer", "conv6"], ["a.png", "b.jpg"],
                 ["a.png", "--class", "predicted", "--methods", "gradcam"]):
        result = visualize(workdir, *(str(workdir / a) if a.endswith((".png", ".jpg")) else a for a in args))
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-and-1-more-conv9.png", "a-conv6.png", "a-conv9-class.png", "a-conv9.png", "b-conv9.png"]
    again = visualize(workdir, str(workdir / "a.png"))
    assert again.exit_code == 2 and "a-conv9.png already exists: pass --force" in again.output


def test_the_readmes_grad_cam_line_works(workdir, tmp_path, monkeypatch):
    """The README's saliency paragraph says how to get Grad-CAM: those options make its map."""
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    options = re.search(r"Grad-CAM explains a class: `([^`]+)`", readme).group(1).split()
    monkeypatch.chdir(tmp_path)
    result = visualize(workdir, str(workdir / "a.png"), *options, "--json")
    assert result.exit_code == 0, result.output
    assert "gradcam" in options and json.loads(result.stdout)["targets"][0]["class"].split()[0] in CLASSES
