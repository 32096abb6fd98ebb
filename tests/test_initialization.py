"""weight_init (xavier-open, xavier, caffe-xavier, kaiming, lsuv), the whitening and Dirac starts, on tiny models and data."""

import pytest
import torch

from allconv_cli import train as trainer
from allconv_cli.models import create_model
from allconv_cli.models.initialization import (
    CLASS_BIAS,
    WHITEN_EPS,
    convs,
    dirac,
    initialize,
    patch_whitening,
    unit_variance,
    first_conv,
    whiten_first_conv,
)
from allconv_cli.train import run as train_run
from allconv_cli.train import settings as configuration


def output_variances(model, x):
    seen = []
    handles = [c.register_forward_hook(lambda m, i, o: seen.append(o.var().item())) for c in convs(model)]
    model.eval()
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def started(scheme: str, seed: int, name: str = "all_cnn_c"):
    """A fresh model (All-CNN-C by default) initialized by ``scheme`` from ``seed``."""
    torch.manual_seed(seed)
    model = create_model(name)
    initialize(model, scheme)
    return model


def test_kaiming_draws_variance_two_over_fan_in_and_zero_biases():
    torch.manual_seed(0)
    model = create_model("all_cnn_c")
    initialize(model, "kaiming")
    for conv in convs(model)[1:-1]:  # enough weights for a tight estimate
        fan_in = conv.weight[0].numel()
        assert conv.weight.var().item() == pytest.approx(2 / fan_in, rel=0.05)
        assert torch.count_nonzero(conv.bias) == 0


@pytest.mark.parametrize("name", ["all_cnn_c", "model_a"])  # 3x3 and 5x5 first convs, 1x1 class convs
def test_caffe_xavier_draws_uniform_variance_one_over_fan_in_and_zero_biases(name):
    """Caffe's XavierFiller at its defaults: U(-a, a), a = sqrt(3 / fan_in), fan_in = C_in kh kw."""
    model = started("caffe-xavier", seed=9, name=name)
    for conv in convs(model):  # conv1 included: its 27 inputs spread 4 times as wide as xavier's
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = (3 / fan_in) ** 0.5
        assert conv.weight.var().item() == pytest.approx(1 / fan_in, rel=0.1), conv
        assert bound * 0.98 < conv.weight.abs().max().item() <= bound  # uniform up to the edge, never past it
        assert conv.weight.mean().abs().item() < 0.05 * bound
        assert torch.count_nonzero(conv.bias) == 0
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(convs(model), convs(started("caffe-xavier", 9, name))))
    assert not torch.equal(convs(model)[0].weight, convs(started("caffe-xavier", 10, name))[0].weight)


def test_xavier_is_the_models_own():
    torch.manual_seed(4)
    own = create_model("all_cnn_a")
    torch.manual_seed(4)
    again = create_model("all_cnn_a")
    initialize(again, "xavier")  # draws afresh from the same distribution
    for a, b in zip(convs(own), convs(again)):
        assert a.weight.abs().max() <= (6 / (a.weight[0].numel() + a.weight.shape[0] * a.weight[0, 0].numel())) ** 0.5
        assert torch.all(b.bias == 0.1) and a.weight.shape == b.weight.shape


def test_lsuv_gives_every_conv_unit_variance_on_its_batch():
    torch.manual_seed(1)
    model = create_model("all_cnn_c")
    x = torch.randn(16, 3, 32, 32)
    initialize(model, "lsuv", x)
    assert model.training  # left in the mode it was in
    assert output_variances(model, x) == pytest.approx([1.0] * 9, abs=0.05)
    for conv in convs(model):  # orthogonal before scaling: the (out, in k k) matrix's rows or columns
        matrix = conv.weight.detach().flatten(1)
        gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
        assert torch.allclose(gram / gram.diagonal().mean(), torch.eye(len(gram)), atol=1e-4)


def test_xavier_leaves_the_signal_small_and_kaiming_keeps_it():
    x = torch.randn(16, 3, 32, 32)
    variances = {}
    for scheme in ("xavier", "kaiming"):
        model = started(scheme, seed=2)
        variances[scheme] = output_variances(model, x)[-2]  # conv8, the last before the class conv
    assert variances["xavier"] < 0.2 < 1 < variances["kaiming"]


def test_inits_are_deterministic_and_reach_the_run(tmp_path):
    def start(seed, **settings):
        """(conv1, conv2) weights of a run built from ``seed``."""
        config = configuration.resolve(None, train_limit=64, test_limit=32, batch_size=32, epochs=1,
                                       seed=seed, precision="fp32", **settings)
        train_run._seed(config)
        features = trainer.build(config, torch.device("cpu")).model.features
        return torch.cat([features.conv1.conv.weight.flatten(), features.conv2.conv.weight.flatten()]).detach()

    for settings in ({"weight_init": "kaiming"}, {"weight_init": "lsuv"}, {"weight_init": "caffe-xavier"},
                     {"whiten": "init", "batch_norm": True}, {"dirac": True, "batch_norm": True}):
        assert torch.equal(start(0, **settings), start(0, **settings)), settings
        assert not torch.equal(start(0, **settings), start(1, **settings)), settings
    config = configuration.resolve(None, train_limit=64, test_limit=32, batch_size=32, epochs=1, weight_init="kaiming")
    trainer.train(config, tmp_path / "run")
    assert trainer.load_run_config(tmp_path / "run").weight_init == "kaiming"


def test_bad_schemes():
    with pytest.raises(ValueError, match="unknown weight_init 'he'"):
        initialize(create_model("all_cnn_a"), "he")
    with pytest.raises(ValueError, match="needs a batch"):
        initialize(create_model("all_cnn_a"), "lsuv")
    with pytest.raises(ValueError, match="--weight-init he is not allowed"):
        configuration.resolve(None, weight_init="he")


def test_unit_variance_reports_what_it_reached():
    torch.manual_seed(3)
    model = create_model("all_cnn_a", batch_norm=True)
    reached = unit_variance(model, torch.randn(8, 3, 32, 32))
    assert len(reached) == len(convs(model)) and all(abs(v - 1) < 0.05 for v in reached)


def test_xavier_open_starts_the_class_relu_open_on_every_image():
    x = torch.randn(32, 3, 32, 32)
    passed = {}
    for scheme in ("xavier", "xavier-open"):
        model = started(scheme, seed=5)
        head = convs(model)[-1]
        assert torch.all(head.bias == (CLASS_BIAS if scheme == "xavier-open" else 0.1))
        assert all(torch.all(c.bias == 0.1) for c in convs(model)[:-1])
        model.eval()
        with torch.no_grad():
            scores = model.features(x)  # after the class ReLU
        passed[scheme] = (scores > 0).float().mean().item()
    assert passed["xavier-open"] == 1.0 > passed["xavier"]


def test_patch_whitening_whitens_the_patches():
    torch.manual_seed(6)
    mixing = torch.randn(3, 3)  # correlated colour channels, smoothed: strongly correlated patches
    images = torch.einsum("ij,njhw->nihw", mixing, torch.randn(64, 3, 16, 16))
    images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    filters = patch_whitening(images, 3)
    assert filters.shape == (54, 3, 3, 3) and torch.equal(filters[27:], -filters[:27])
    out = torch.nn.functional.conv2d(images.double(), filters[:27].double())  # (N, 27, h, w)
    covariance = torch.cov(out.permute(1, 0, 2, 3).flatten(1))
    eigenvalues = torch.linalg.eigvalsh(torch.cov(torch.nn.functional.unfold(images.double(), 3)
                                                  .transpose(1, 2).reshape(-1, 27).T))
    # unit variance and no correlation, but for the eps's damping of the faintest directions
    assert torch.allclose(covariance, torch.diag(eigenvalues / (eigenvalues + WHITEN_EPS)), atol=0.02)
    assert covariance.diagonal()[-20:].min() > 0.95


def test_a_5x5_first_conv_takes_the_strongest_components_it_can_hold():
    """Model A's first conv (96 filters, 5x5 on RGB: 75 components) whitens the 48 of largest
    variance in both signs, filling all 96 filters, instead of refusing the whitening."""
    torch.manual_seed(8)
    images = torch.nn.functional.avg_pool2d(torch.randn(16, 3, 20, 20), 3, 1, 1)  # correlated patches
    model = create_model("model_a")  # with conv biases, which the whitened filters set to 0
    whiten_first_conv(model, images)
    first = convs(model)[0]
    everything = patch_whitening(images, 5)  # (150, 3, 5, 5): the 75 components, ascending, then negated
    assert first.weight.shape[0] == 96 and torch.allclose(first.weight[:48], everything[27:75], atol=1e-5)
    assert torch.allclose(first.weight[48:], -first.weight[:48]) and torch.all(first.bias == 0)
    # the 48 kept have the largest variance: each output has unit variance (but for the eps)
    out = torch.nn.functional.conv2d(images.double(), first.weight[:48].double())
    assert out.permute(1, 0, 2, 3).flatten(1).var(1).min() > 0.9
    with pytest.raises(ValueError, match="1 to 75 components"):
        patch_whitening(images, 5, 76)


def test_whiten_first_conv_and_dirac_set_only_their_filters():
    torch.manual_seed(7)
    model = create_model("all_cnn_c", batch_norm=True)
    before = [c.weight.detach().clone() for c in convs(model)]
    images = torch.randn(8, 3, 32, 32)
    whiten_first_conv(model, images)
    first = convs(model)[0].weight
    assert torch.allclose(first[:54], patch_whitening(images, 3)) and torch.equal(first[54:], before[0][54:])
    dirac(model)
    for conv, old in zip(convs(model)[1:-1], before[1:-1]):
        inputs = conv.in_channels
        identity = torch.zeros_like(conv.weight[:inputs])
        torch.nn.init.dirac_(identity)
        assert torch.equal(conv.weight[:inputs], identity) and torch.equal(conv.weight[inputs:], old[inputs:])
    assert torch.equal(convs(model)[-1].weight, before[-1])  # the class conv keeps its start


def test_whiten_frozen_is_never_trained_and_dirac_reaches_the_run(tmp_path):
    config = configuration.resolve(None, train_limit=64, test_limit=32, batch_size=32, epochs=1, batch_norm=True,
                                   whiten="frozen", dirac=True, precision="fp32")
    train_run._seed(config)
    setup = trainer.build(config, torch.device("cpu"))
    start = first_conv(setup.model).weight.detach().clone()
    trainer.train(config, tmp_path / "run")
    from allconv_cli.files.weights import load_model

    model = load_model(tmp_path / "run")[0]
    assert torch.equal(first_conv(model).weight, start)  # same seed, same start, never moved
    conv2 = model.features.conv2.conv.weight
    assert conv2[0, 0, 1, 1] != 0  # trained from the identity, still there


def test_the_default_init_is_the_one_measured_on_two_kinds_of_data():
    """xavier-open was chosen on validation splits of CIFAR-10 and of the handwritten digits
    (docs/RESULTS.md, issue #36): a new default needs new measurements there, not a silent edit."""
    assert configuration.TrainConfig().weight_init == "xavier-open" and CLASS_BIAS == 1.0
