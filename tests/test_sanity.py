"""The sanity checks (Adebayo et al., 2018): similarity functions against hand values, the stages,
the re-initialization, and ``allconv sanity`` end to end on a tiny checkpoint and 16x16 images."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.explain.methods import fitting
from allconv_cli.explain.sanity import (
    randomized,
    sanity_check,
    similarity,
    spearman,
    ssim,
    stages,
)
from allconv_cli.files import loading
from allconv_cli.files.weights import save_weights
from allconv_cli.models import create_model

runner = CliRunner()
CLASSES = ["cat", "dog", "ship"]


def test_spearman_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10 + 3) == pytest.approx(1)
    assert spearman(a, -a) == pytest.approx(-1)
    # ties get their average rank: [1, 1, 2] -> ranks [1.5, 1.5, 3] against [1, 2, 3];
    # deviations (-0.5, -0.5, 1) and (-1, 0, 1): 1.5 / sqrt(1.5 * 2) = sqrt(3) / 2
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(math.sqrt(3) / 2)
    # ranks (2, 1, 4, 3) against (1, 2, 3, 4): 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 60
    assert spearman(torch.tensor([0.5, 0.1, 9.0, 3.0]), a) == pytest.approx(0.6)
    assert math.isnan(spearman(torch.zeros(4), a))  # a constant map has no ranks to correlate
    with pytest.raises(ValueError, match="4 values against 3"):
        spearman(a, a[:3])


def test_ssim_by_hand():
    x = torch.rand(20, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert ssim(x, x) == pytest.approx(1)
    # constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) at every position
    a, b = torch.full((16, 16), 0.2, dtype=torch.float64), torch.full((16, 16), 0.6, dtype=torch.float64)
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4))
    # an 11x11 image is one window: the Gaussian-weighted statistics written out
    y = torch.rand(11, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = (0.5 * y + 0.3 * torch.rand(11, 11, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    yn, zn = y.numpy(), z.numpy()
    my, mz = (w * yn).sum(), (w * zn).sum()
    vy, vz = (w * (yn - my) ** 2).sum(), (w * (zn - mz) ** 2).sum()
    cov = (w * (yn - my) * (zn - mz)).sum()
    hand = (2 * my * mz + 1e-4) * (2 * cov + 9e-4) / ((my**2 + mz**2 + 1e-4) * (vy + vz + 9e-4))
    assert ssim(y, z) == pytest.approx(hand, rel=1e-9)
    assert ssim(y[:7, :8], z[:7, :8]) <= 1  # under 11 px: a 7x7 window
    with pytest.raises(ValueError, match="two \\(H, W\\) images"):
        ssim(y, z[None])


def test_similarity_scores_the_maps_as_shown():
    m = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(3))
    same = similarity(m, 2 * m)  # scaling changes no rank and, scaled to [0, 1], no pixel
    assert same == pytest.approx({"spearman_abs": 1, "spearman_signed": 1, "ssim": 1})
    flipped = similarity(m, -m)  # |map| is the same, the signed map is reversed
    assert flipped["spearman_abs"] == pytest.approx(1) and flipped["spearman_signed"] == pytest.approx(-1)
    assert flipped["ssim"] == pytest.approx(1)


def test_stages():
    model = create_model("all-cnn-c")
    cascade = stages(model, "conv9", "cascade")
    assert cascade[0] == ["conv9"] and cascade[1] == ["conv9", "conv8"]
    assert cascade[-1] == [f"conv{i}" for i in range(9, 0, -1)] and len(cascade) == 9
    assert stages(model, "conv9", "independent") == [[f"conv{i}"] for i in range(9, 0, -1)]
    assert stages(model, "conv3", "cascade") == [["conv3"], ["conv3", "conv2"], ["conv3", "conv2", "conv1"]]


def test_randomized_uses_the_model_initializer_and_leaves_the_model():
    torch.manual_seed(0)
    model = create_model("all-cnn-c", num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3).add_(1)  # "trained": far from any initialization
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    out = randomized(model, ["conv9", "conv5"], seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for key, value in out.state_dict().items():
        layer = key.split(".")[1]
        assert torch.equal(value, state[key]) is (layer not in ("conv9", "conv5")), key
    conv = out.get_layer("conv5").conv
    bound = math.sqrt(6 / ((conv.in_channels + conv.out_channels) * 9))  # Xavier-uniform, 3x3
    assert conv.weight.abs().max() <= bound and torch.equal(conv.bias, torch.full_like(conv.bias, 0.1))
    again = randomized(model, ["conv5"], seed=7)
    assert torch.equal(again.get_layer("conv5").conv.weight, conv.weight)  # the seed fixes it
    assert not torch.equal(randomized(model, ["conv5"], seed=8).get_layer("conv5").conv.weight, conv.weight)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 3-class All-CNN-C checkpoint for 16x16 input, its twin from another seed, two images."""
    folder = tmp_path_factory.mktemp("sanity")
    meta = {"model": "all_cnn_c", "model_kwargs": {"num_classes": 3}, "classes": CLASSES,
            "input_size": [3, 16, 16],
            "preprocess": {"kind": "standardize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    for name, seed in (("run", 0), ("shuffled", 1)):
        torch.manual_seed(seed)
        save_weights(folder / name / "model.safetensors", create_model("all-cnn-c", num_classes=3), meta)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "b.png")
    return folder


def test_sanity_check_stages_scores_and_an_untouched_model(workdir):
    loaded = loading.load_checkpoint(workdir / "run")
    model = loaded.model.train()  # train mode too must come back as it was
    state = copy.deepcopy(model.state_dict())
    images = [workdir / "a.png", workdir / "b.png"]
    result = sanity_check(loaded, images, methods=["guided", "gradcam"], mode="independent")
    assert [m.training for m in model.modules()] == [True] * len(list(model.modules()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert result.stage_names == [f"conv{i}" for i in range(9, 0, -1)]
    assert result.maps["guided"].shape == (10, 2, 3, 16, 16) and result.maps["gradcam"].shape == (10, 2, 1, 16, 16)
    assert all(t.layer is None for t in result.targets)  # the trained model's predicted classes
    from allconv_cli.explain.saliency import explain

    trained = explain(loaded, images, None, ["guided"], target_class="predicted")
    assert [t.channel for t in trained.targets] == [t.channel for t in result.targets]
    torch.testing.assert_close(result.maps["guided"][0], trained.maps["guided"], rtol=0, atol=0)
    assert result.scores["guided"]["ssim"].shape == (9, 2)
    assert len(result.table()) == 2 * 9 and set(result.table()[0]) >= {"spearman_abs", "spearman_signed", "ssim"}
    # against itself every map is the same: every score is 1
    same = sanity_check(loaded, images, "conv9", methods=["backprop", "guided"], target_class="cat",
                        against=loaded)
    assert same.stage_names == [f"against {(workdir / 'run').name}"]
    for row in same.table():
        assert row["spearman_abs"] == pytest.approx(1) and row["ssim"] == pytest.approx(1)
    # a neuron of conv3: only conv3 and the layers below can change its map
    neuron = sanity_check(loaded, images[:1], "conv3", seed=3)
    assert list(neuron.maps) == list(fitting(by_class=False))  # every method that explains a neuron
    assert {"backprop", "deconvnet", "guided", "integrated-gradients", "occlusion"} <= set(neuron.maps)
    assert neuron.stage_names == ["conv3", "conv3..conv2", "conv3..conv1"]
    assert {t.layer for t in neuron.targets} == {"conv3"}


def sanity(workdir, *args):
    return runner.invoke(app, ["sanity", *args, "--checkpoint", str(workdir / "run"), "--device", "cpu"])


def test_the_command_writes_pngs_and_the_table(workdir, tmp_path):
    out = tmp_path / "out"
    args = [str(workdir / "a.png"), str(workdir / "b.png"), "--layer", "conv3", "--methods", "guided,backprop",
            "--out", str(out)]
    result = sanity(workdir, *args, "--mode", "independent", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["mode"] == "independent" and report["precision"] == "fp32" and report["seed"] == 0
    assert [s["randomized"] for s in report["stages"]] == [["conv3"], ["conv2"], ["conv1"]]
    assert len(report["table"]) == 6 and np.array(report["per_image"]["guided"]["ssim"]).shape == (3, 2)
    assert sorted(p.name for p in out.iterdir()) == ["backprop.png", "guided.png", "similarity.png"]
    for name in ("guided.png", "similarity.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 5 * 64
    refused = sanity(workdir, *args)
    assert refused.exit_code == 2 and "guided.png already exists: pass --force" in refused.output
    table = sanity(workdir, *args, "--force")
    assert table.exit_code == 0, table.output
    assert "conv3..conv1" in table.output and "Spearman" in table.output and "wrote " in table.output
    against = sanity(workdir, *args, "--force", "--against", str(workdir / "shuffled"))
    assert against.exit_code == 0, against.output
    assert "against shuffled" in against.output


@pytest.mark.parametrize("args, expected", [
    (["--mode", "sideways"], "unknown --mode 'sideways'"),
    (["--methods", "guidde"], "did you mean 'guided'"),
    (["--layer", "conv4", "--methods", "gradcam"], "gradcam explain a class score"),
    (["--layer", "conv44"], "did you mean 'conv4'"),
    (["--class", "cta"], "did you mean 'cat'"),
    (["--precision", "fp16"], "fp16 autocast runs on CUDA only"),
    (["--against", "nowhere"], "no checkpoint at nowhere"),
    (["--against", "RUN", "--mode", "independent"], "takes no --mode"),
])
def test_bad_input_is_one_line(workdir, tmp_path, args, expected):
    args = [str(workdir / "run") if a == "RUN" else a for a in args]
    result = sanity(workdir, str(workdir / "a.png"), "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.skipif(not loading.BUNDLED_CHECKPOINT.is_file(), reason="the bundled All-CNN-C is not in this checkout")
def test_the_bundled_model_on_a_photograph(tmp_path):
    from pathlib import Path

    cat = Path(__file__).resolve().parents[1] / "docs" / "chelsea.png"
    result = runner.invoke(app, ["sanity", str(cat), "--methods", "guided", "--out", str(tmp_path), "--device",
                                 "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["targets"][0]["channel"] == 3  # the bundled model calls Chelsea a cat
    assert len(report["table"]) == 9
