"""Faithfulness metrics: AUCs and imputations against hand values, a linear model whose true
contributions must beat a random map, pytorch-grad-cam's ROAD as an independent reference, the
chart, and ``allconv faithfulness`` end to end on a tiny checkpoint: its count and time estimate,
its bounds, and its inputs checked before its output."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.cli import faithfulness as command
from allconv_cli.explain import faithfulness as faith_module
from allconv_cli.explain import figures
from allconv_cli.explain.faithfulness import faithfulness
from allconv_cli.explain.perturbation import (
    ROAD_FRACTIONS,
    auc,
    impute,
    interval,
    model_free_map,
    perturbation_curves,
    relevance,
    removal_ranks,
)
from allconv_cli.files import loading
from allconv_cli.files.weights import save_weights
from allconv_cli.models import create_model

runner = CliRunner()
CLASSES = ["cat", "dog", "ship"]


class Linear(nn.Module):
    """Logits (sum of weight * x, 0): class 0's probability is sigmoid of the weighted sum."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        score = (self.weight * x).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], 1)


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def test_deletion_and_insertion_by_hand():
    # one 1x2 image [2, 1], logit x0 + x1, the map ranks pixel 0 first, baseline 0:
    # deletion sees logits 3, 1 (pixel 0 gone), 0; insertion 0, 2 (pixel 0 back), 3
    model = Linear(torch.ones(1, 1, 2))
    x = torch.tensor([[[[2.0, 1.0]]]])
    curves = perturbation_curves(model, x, torch.tensor([0]), torch.tensor([[[5.0, 1.0]]]), baseline=torch.zeros_like(x),
                                 steps=2)
    torch.testing.assert_close(curves["deletion"], torch.tensor([[sigmoid(3), sigmoid(1), 0.5]]))
    torch.testing.assert_close(curves["insertion"], torch.tensor([[0.5, sigmoid(2), sigmoid(3)]]))
    # trapezoids over fractions 0, 1/2, 1: (first + 2 middle + last) / 4
    assert auc(curves["deletion"]).item() == pytest.approx((sigmoid(3) + 2 * sigmoid(1) + 0.5) / 4)
    assert auc(curves["insertion"]).item() == pytest.approx((0.5 + 2 * sigmoid(2) + sigmoid(3)) / 4)
    assert auc(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])).item() == pytest.approx(0.125)  # a triangle, 1/4 wide
    assert curves["road_morf"].shape == (1, len(ROAD_FRACTIONS))


def test_imputation_by_hand():
    # a 1x3 row, middle removed: its in-image neighbours are left and right, 1/6 each
    x = torch.tensor([[[[1.0, 9.0, 4.0]]]])
    out = impute(x, torch.tensor([[[False, True, False]]]), noise=0)
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 2.5, 4.0]]]]))
    # a 3x3 centre: edge neighbours weigh 1/6, corners 1/12, in all 1
    grid = torch.arange(9.0).view(1, 1, 3, 3) ** 2
    removed = torch.zeros(1, 3, 3, dtype=torch.bool)
    removed[0, 1, 1] = True
    expected = (grid[0, 0, 0, 1] + grid[0, 0, 1, 0] + grid[0, 0, 1, 2] + grid[0, 0, 2, 1]) / 6 + \
        (grid[0, 0, 0, 0] + grid[0, 0, 0, 2] + grid[0, 0, 2, 0] + grid[0, 0, 2, 2]) / 12
    assert impute(grid, removed, noise=0)[0, 0, 1, 1].item() == pytest.approx(expected.item(), abs=1e-4)
    # two removed neighbours in a row of four solve together: a = (0 + b) / 2, b = (a + 3) / 2
    row = impute(torch.tensor([[[[0.0, 7.0, 7.0, 3.0]]]]), torch.tensor([[[False, True, True, False]]]), noise=0)
    torch.testing.assert_close(row[0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]), atol=1e-4, rtol=0)
    # the noise touches removed pixels only, and the seed fixes it
    noisy = impute(grid, removed, noise=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy[removed[:, None]].ne(grid[removed[:, None]]), torch.tensor([True]))
    assert torch.equal(noisy.masked_fill(removed[:, None], 0), grid.masked_fill(removed[:, None], 0))
    assert torch.equal(noisy, impute(grid, removed, noise=0.5, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="at least one kept pixel"):
        impute(grid, torch.ones(1, 3, 3, dtype=torch.bool))


def test_ranks_relevance_and_model_free_maps():
    maps = torch.tensor([[[[1.0, -3.0], [0.0, 0.0]], [[-1.0, 1.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
    scores = relevance(maps)
    torch.testing.assert_close(scores, torch.tensor([[[2.0, 4.0], [0.0, 2.0]]]))
    ranks = removal_ranks(scores, torch.Generator().manual_seed(0))
    assert ranks[0, 0, 1] == 0 and ranks[0, 1, 0] == 3 and {ranks[0, 0, 0].item(), ranks[0, 1, 1].item()} == {1, 2}
    # ties are broken at random, not in raster order: some seed puts the later pixel first
    orders = {tuple(removal_ranks(torch.zeros(1, 2, 2), torch.Generator().manual_seed(s)).flatten().tolist())
              for s in range(20)}
    assert len(orders) > 5
    edge = torch.zeros(1, 3, 5, 6)
    edge[..., 3:] = 1  # a vertical edge between columns 2 and 3
    sobel = model_free_map("sobel", edge, torch.Generator())
    assert sobel.shape == (1, 1, 5, 6) and sobel[0, 0, :, 2:4].min() > 0 and sobel[0, 0, :, [0, 5]].abs().max() == 0
    assert model_free_map("random", edge, torch.Generator().manual_seed(0)).shape == (1, 1, 5, 6)


def test_interval_is_a_bootstrap_of_the_mean():
    values = torch.arange(100.0)
    mean, low, high = interval(values)
    assert mean == pytest.approx(49.5) and low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * values.std().item() / 10, rel=0.15)  # the normal approximation
    assert interval(torch.tensor([0.3]))[1:] == pytest.approx((0.3, 0.3))


def test_the_true_contributions_beat_a_random_map():
    """A linear model: removing pixel i moves the logit by exactly weight_i * x_i. A map of those
    contributions must be more faithful than a random one on every metric."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.rand(1, 12, 12, generator=generator) * 0.5
    model = Linear(weight)
    x = torch.rand(16, 1, 12, 12, generator=generator)
    classes = torch.zeros(16, dtype=torch.long)
    scores = {"true": relevance(weight * x), "random": torch.rand(16, 12, 12, generator=generator)}
    results = {name: perturbation_curves(model, x - x.mean(), classes, s, baseline="zero",
                                         generator=torch.Generator().manual_seed(1)) for name, s in scores.items()}
    mean = {name: {"deletion": auc(c["deletion"]).mean(), "insertion": auc(c["insertion"]).mean(),
                   "road_morf": c["road_morf"].mean(), "road_lerf": c["road_lerf"].mean()}
            for name, c in results.items()}
    assert mean["true"]["deletion"] < mean["random"]["deletion"] - 0.02
    assert mean["true"]["insertion"] > mean["random"]["insertion"] + 0.02
    assert mean["true"]["road_morf"] < mean["random"]["road_morf"] - 0.02
    assert mean["true"]["road_lerf"] > mean["random"]["road_lerf"] + 0.02


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))

    def forward(self, x):
        return self.body(x) * 4  # confident enough that the probabilities move


# Per image, the mean probability over the nine levels: without noise the two solvers agree to
# 2e-7, with both sides' noise (std 0.01, independent draws) to 9e-5 (measured, torch 2.14.1,
# grad-cam 1.5.7); swapping MoRF and LeRF moves the scores by 0.05.
ROAD_TOLERANCE = {0.0: 1e-4, 0.01: 2e-3}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # grad-cam hands numpy a torch tensor
def test_road_agrees_with_pytorch_grad_cam():
    """pytorch-grad-cam's ROAD (Rong et al.'s own imputer, scipy's sparse solver, one image and
    one level at a time) as the independent reference. On 10x10 images its percentile thresholds
    remove exactly 10 %, ..., 90 % of the pixels, as ours do."""
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    perturbation = pytest.importorskip("pytorch_grad_cam.metrics.perturbation_confidence")
    targets_module = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    model = TinyNet().eval()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 10, 10, generator=generator)
    cams = torch.rand(6, 10, 10, generator=generator)  # no ties
    with torch.no_grad():
        classes = model(x).argmax(1)
    targets = [targets_module.ClassifierOutputSoftmaxTarget(int(c)) for c in classes]

    def reference(noise: float) -> dict[str, np.ndarray]:
        out = {}
        for name, remover in (("road_morf", perturbation.RemoveMostRelevantFirst),
                              ("road_lerf", perturbation.RemoveLeastRelevantFirst)):
            # percentile p keeps (MoRF) the p % least relevant, i.e. removes 100 - p %; the nine
            # levels are the same set as ours
            per_level = [perturbation.PerturbationConfidenceMetric(remover(p, road.NoisyLinearImputer(noise=noise)))(
                x, cams.numpy(), targets, model, return_diff=False) for p in range(10, 100, 10)]
            out[name] = np.mean(per_level, axis=0)
        return out

    for noise, tolerance in ROAD_TOLERANCE.items():
        torch.manual_seed(3)  # grad-cam draws its noise from the global generator
        theirs = reference(noise)
        ours = perturbation_curves(model, x, classes, cams, noise=noise, generator=torch.Generator().manual_seed(4))
        for name in ("road_morf", "road_lerf"):
            np.testing.assert_allclose(ours[name].mean(1).numpy(), theirs[name], atol=tolerance, rtol=0,
                                       err_msg=f"{name}, noise {noise}")
    # the same imputation, pixel for pixel, on a mask of each level
    removed = cams[None] >= torch.tensor(ROAD_FRACTIONS).view(-1, 1, 1, 1)
    for level in range(len(ROAD_FRACTIONS)):
        ours = impute(x, removed[level], noise=0)
        theirs = torch.stack([road.NoisyLinearImputer(noise=0)(x[i], (~removed[level, i]).float()) for i in range(6)])
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)  # the solvers' tolerance: 1e-4 of the residual


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 3-class All-CNN-C checkpoint for 16x16 input and two images."""
    folder = tmp_path_factory.mktemp("faithfulness")
    meta = {"model": "all_cnn_c", "model_kwargs": {"num_classes": 3}, "classes": CLASSES, "input_size": [3, 16, 16],
            "preprocess": {"kind": "standardize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    torch.manual_seed(0)
    save_weights(folder / "run" / "model.safetensors", create_model("all-cnn-c", num_classes=3), meta)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "b.png")
    return folder


def test_faithfulness_on_files_leaves_the_model_and_is_seeded(workdir):
    loaded = loading.load_checkpoint(workdir / "run")
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    paths = [workdir / "a.png", workdir / "b.png"]
    result = faithfulness(loaded, paths, methods=["guided", "gradcam", "random", "sobel"], steps=4, precision="fp32")
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert result.methods == ["guided", "gradcam", "random", "sobel"] and result.cam_layer == "conv9"
    assert result.curves["guided"]["deletion"].shape == (2, 5) and result.curves["sobel"]["road_lerf"].shape == (2, 9)
    assert result.fractions == [0, 0.25, 0.5, 0.75, 1]
    table = result.table()
    assert [row["method"] for row in table] == result.methods
    assert all(0 <= row[m + "_low"] <= row[m] <= row[m + "_high"] <= 1 for row in table
               for m in ("deletion", "insertion", "road_morf", "road_lerf"))
    again = faithfulness(loaded, paths, methods=["guided", "gradcam", "random", "sobel"], steps=4, precision="fp32")
    for method in result.methods:
        for metric, curves in result.curves[method].items():
            torch.testing.assert_close(curves, again.curves[method][metric], rtol=0, atol=0)
    with pytest.raises(ValueError, match="did you mean 'sobel'"):
        faithfulness(loaded, paths, methods=["sobell"])


def run(workdir, *args):
    return runner.invoke(app, ["faithfulness", *args, "--checkpoint", str(workdir / "run"), "--device", "cpu"])


def test_the_command_writes_the_chart_and_the_table(workdir, tmp_path):
    out = tmp_path / "chart.png"
    args = [str(workdir / "a.png"), str(workdir / "b.png"), "--methods", "backprop,guided,random", "--steps", "4",
            "--out", str(out)]
    result = run(workdir, *args, "--json", "--class", "dog", "--baseline", "zero")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["selection"] == "the class dog (1)" and report["baseline"] == "zero" and report["seed"] == 0
    assert [row["method"] for row in report["table"]] == ["backprop", "guided", "random"]
    assert report["per_image"]["classes"] == [1, 1] and len(report["mean_curves"]["guided"]["deletion"]) == 5
    assert len(report["per_image"]["scores"]["random"]["road_morf"]) == 2
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 800
    refused = run(workdir, *args)
    assert refused.exit_code == 2 and "chart.png already exists: pass --force" in refused.output
    table = run(workdir, *args, "--force")
    assert table.exit_code == 0, table.output
    assert "deletion AUC" in table.output and "ROAD LeRF" in table.output and "wrote " in table.output


def test_the_command_scores_a_split_with_a_limit(workdir, tmp_path):
    result = run(workdir, "--limit", "3", "--methods", "gradcam,sobel", "--steps", "2", "--json", "--batch-size", "1",
                 "--out", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == "3 images of sample test (a random subset of 1,000, seed 0)"
    assert len(report["per_image"]["labels"]) == 3 and len(report["per_image"]["scores"]["gradcam"]["deletion"]) == 3
    # before scoring: how many images, then from the second map (one image, batch size 1) how long
    said = result.stderr.splitlines()
    assert said[0] == "scoring 3 images of sample test (--limit all scores all 1,000), 2 maps each"
    assert re.fullmatch(r"scored 2 of 6 maps in \d+ s: about \d+ s in all on this machine; "
                        r"all 1,000 would take about .+", said[1]), said
    assert len(said) == 2
    quiet = run(workdir, "--limit", "3", "--methods", "sobel", "--steps", "2", "--quiet", "--out", str(tmp_path / "q.png"))
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output


def test_the_default_count_and_all(workdir, tmp_path, monkeypatch):
    """--limit: DEFAULT_LIMIT images unless given; all of them with 'all'."""
    asked = []

    def fake(loaded, images, **options):
        asked.append(options["count"])
        raise ValueError("stopped here")

    monkeypatch.setattr(faith_module, "faithfulness", fake)
    for limit in ([], ["--limit", "all"], ["--limit", "7"]):
        result = run(workdir, "--out", str(tmp_path / "d.png"), *limit)
        assert result.exit_code == 2 and "stopped here" in result.output
    assert asked == [command.DEFAULT_LIMIT, None, 7]


@pytest.mark.parametrize("args, expected", [
    (["--methods", "guidde"], "did you mean 'guided'"),
    (["--baseline", "blurr"], "did you mean 'blur'"),
    (["--class", "cta"], "did you mean 'cat'"),
    (["--steps", "0"], "--steps 0: give 1 to 256, the pixels of the model's 16x16 input"),
    (["--steps", "1000000000"], "--steps 1000000000: give 1 to 256"),
    (["--batch-size", "0"], "--batch-size 0: give at least 1"),
    (["--batch-size", "3"], "--batch-size 3: give 1 to 1, the images scored"),
    (["--layer", "conv44"], "did you mean 'conv4'"),
    (["--out", "chart.jpg"], "must end in .png"),
    (["--limit", "3"], "--limit and --data-dir choose images of a data split"),
    (["--precision", "fp16"], "fp16 autocast runs on CUDA only"),
])
def test_bad_input_is_one_line(workdir, tmp_path, args, expected):
    result = run(workdir, str(workdir / "a.png"), "--out", str(tmp_path / "out.png"), *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("args, expected", [
    (["--limit", "0"], "--limit 0: give at least 1"),
    (["--limit", "1001"], "--limit 1001: sample test has 1,000 images; give 1 to 1000, or all"),
    (["--limit", "lots"], "--limit takes a number of images or all, got 'lots'"),
    (["--limit", "5", "--batch-size", "6"], "--batch-size 6: give 1 to 5, the images scored"),
])
def test_bounds_on_a_split_are_one_line(workdir, tmp_path, args, expected):
    result = run(workdir, "--out", str(tmp_path / "out.png"), "--methods", "sobel", *args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"Error: {expected}"
    assert not (tmp_path / "out.png").exists()


def test_inputs_are_checked_before_the_output(workdir, tmp_path, monkeypatch):
    """A folder given as an image is reported, not the chart a former run left."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faithfulness.png").write_bytes(b"a former chart")
    (tmp_path / "photos").mkdir()
    result = run(workdir, "photos")
    assert result.exit_code == 2 and "photos is a folder, not an image file" in result.output, result.output
    result = run(workdir, str(workdir / "a.png"), "--methods", "sobel", "--steps", "2")
    assert result.exit_code == 2 and "faithfulness.png already exists: pass --force" in result.output
    assert (tmp_path / "faithfulness.png").read_bytes() == b"a former chart"


def test_the_chart_is_titled_as_asked(workdir, tmp_path, monkeypatch):
    """Each panel's legend names the methods; the chart's title is the run's, not a method's."""
    loaded = loading.load_checkpoint(workdir / "run")
    result = faithfulness(loaded, [workdir / "a.png"], methods=["guided", "sobel"], steps=2, precision="fp32")
    figure = figures.faithfulness_figure(result, "a title")
    assert figure.get_suptitle() == "a title"
    for axes in figure.axes:
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        assert labels[0].startswith("guided backprop (") and labels[1].startswith("sobel map (")
    titles = []
    real = figures.faithfulness_figure

    def drawn(*args):
        figure = real(*args)
        titles.append(figure.get_suptitle())
        return figure

    monkeypatch.setattr(figures, "faithfulness_figure", drawn)
    ran = run(workdir, str(workdir / "a.png"), "--methods", "guided,sobel", "--steps", "2", "--baseline", "zero",
              "--seed", "3", "--out", str(tmp_path / "c.png"))
    assert ran.exit_code == 0, ran.output
    assert len(titles) == 1 and re.fullmatch(r"all-cnn-c \(.+run.*\) on 1 image files; each image's predicted "
                                             r"class; zero baseline, seed 3, (bf16|fp32)", titles[0]), titles


def test_both_neighbour_sums_agree():
    from allconv_cli.explain import perturbation as faith

    x = torch.randn(2, 3, 9, 70, generator=torch.Generator().manual_seed(5))  # wider than _MATMUL_SIZE: slices
    sliced = faith._neighbour_sum(x)
    products = torch.cat([faith._neighbour_sum(x[..., i:i + 35]) for i in (0, 35)], -1)  # 35 px: matrix products
    inner = [c for c in range(70) if c not in (34, 35)]  # the seam between the halves lacks its other neighbours
    torch.testing.assert_close(products[..., inner], sliced[..., inner])


@pytest.mark.slow  # ROAD imputes 160 x 160 images: about 10 s of CPU
def test_a_timm_net_from_a_plain_state_dict(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), str(tmp_path / "net.safetensors"))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    result = runner.invoke(app, ["faithfulness", str(tmp_path / "a.png"), "--model", "test_resnet", "--checkpoint",
                                 str(tmp_path / "net.safetensors"), "--methods", "gradcam", "--steps", "2", "--json",
                                 "--out", str(tmp_path / "c.png"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    last_stage = timm.create_model("test_resnet").feature_info[-1]["module"]
    assert report["model"] == "test_resnet" and report["cam_layer"] == last_stage
    assert len(report["per_image"]["scores"]["gradcam"]["road_lerf"]) == 1


def test_the_estimate_times_the_maps_after_the_first(monkeypatch, tmp_path, capsys):
    """Issue #58: the first map pays the warm-up (10 s here, then 1 s a map); an estimate from it
    said 60 s for a run of 15 s. Timed from the first report on, it says 15 s."""
    clock = iter([0.0, 10.0, 11.0, 12.0])
    monkeypatch.setattr(command.time, "perf_counter", lambda: next(clock))
    ready, progress, stop = command._reporting(tmp_path / "c.png", False, False, ("image", " of sample test"), 2)
    ready(3, 1000)
    for done in (1, 2, 3):
        progress(done, 6)
    stop()
    said = capsys.readouterr().err.splitlines()
    assert said[1] == ("scored 2 of 6 maps in 11 s: about 15 s in all on this machine; "
                       "all 1,000 would take about 33 min 20 s"), said
    assert len(said) == 2
