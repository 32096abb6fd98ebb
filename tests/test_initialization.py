"""weight_init: xavier (the model's own), kaiming and lsuv, on tiny models and data."""

import pytest
import torch

from allconv_cli import config as configuration, train as trainer
from allconv_cli.initialization import convs, initialize, unit_variance
from allconv_cli.models import create_model


def output_variances(model, x):
    seen = []
    handles = [c.register_forward_hook(lambda m, i, o: seen.append(o.var().item())) for c in convs(model)]
    model.eval()
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def test_kaiming_draws_variance_two_over_fan_in_and_zero_biases():
    torch.manual_seed(0)
    model = create_model("all_cnn_c")
    initialize(model, "kaiming")
    for conv in convs(model)[1:-1]:  # enough weights for a tight estimate
        fan_in = conv.weight[0].numel()
        assert conv.weight.var().item() == pytest.approx(2 / fan_in, rel=0.05)
        assert torch.count_nonzero(conv.bias) == 0


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
        torch.manual_seed(2)
        model = create_model("all_cnn_c")
        initialize(model, scheme)
        variances[scheme] = output_variances(model, x)[-2]  # conv8, the last before the class conv
    assert variances["xavier"] < 0.2 < 1 < variances["kaiming"]


def test_inits_are_deterministic_and_reach_the_run(tmp_path):
    def first_conv(scheme, seed):
        config = configuration.resolve(None, train_limit=64, test_limit=32, batch_size=32, epochs=1,
                                       weight_init=scheme, seed=seed, precision="fp32")
        trainer._seed(config, 0)
        return trainer.build(config, torch.device("cpu")).model.features.conv1.conv.weight.detach().clone()

    for scheme in ("kaiming", "lsuv"):
        assert torch.equal(first_conv(scheme, 0), first_conv(scheme, 0))
        assert not torch.equal(first_conv(scheme, 0), first_conv(scheme, 1))
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
