import json
import math
import subprocess
import sys

import pytest
import timm
import torch
from torchvision.models.feature_extraction import (
    create_feature_extractor,
    get_graph_node_names,
)
from typer.testing import CliRunner

import allconv_cli
import allconv_cli.models.registry as registry
from allconv_cli.ablate import FAMILIES, select_models
from allconv_cli.cli import app
from allconv_cli.evaluate import paper_error
from allconv_cli.files.loading import load_checkpoint
from allconv_cli.files.weights import load_weights
from allconv_cli.models import (
    BUNDLED_MEAN,
    BUNDLED_STD,
    BUNDLED_WEIGHTS,
    CIFAR10_CLASSES,
    NETWORKS,
    create_model,
    default_config,
    describe,
    list_models,
    model_options,
    resolve_name,
)
from allconv_cli.train import settings

# The registry itself, as timm holds it: every name registered from our module.
REGISTERED = timm.list_models(module=registry.__name__.rsplit(".", 1)[-1])
CIFAR = [name for name in REGISTERED if default_config(name)["input_size"] == (3, 32, 32)]

# Exact weights + biases, worked out by hand from PAPER.md's layer lists; all_cnn_c_bn is
# all_cnn_c less its 1,258 conv biases plus 2 x 1,258 BatchNorm weights and biases.
EXACT_PARAMS = {
    "model_a": 839_242,
    "strided_cnn_a": 839_242,
    "convpool_cnn_a": 1_254_250,
    "all_cnn_a": 1_254_250,
    "model_b": 885_610,
    "strided_cnn_b": 885_610,
    "convpool_cnn_b": 1_300_618,
    "all_cnn_b": 1_300_618,
    "model_c": 954_730,
    "strided_cnn_c": 954_730,
    "convpool_cnn_c": 1_369_738,
    "all_cnn_c": 1_369_738,
    "all_cnn_imagenet": 9_372_840,
    "all_cnn_c_bn": 1_370_996,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def native_input(name, batch=1):
    return torch.randn(batch, *default_config(name)["input_size"])


def test_the_table_is_the_timm_registry():
    assert sorted(NETWORKS) == REGISTERED == sorted(EXACT_PARAMS)
    assert list_models() == [name.replace("_", "-") for name in NETWORKS]
    assert list_models()[12:] == ["all-cnn-imagenet", "all-cnn-c-bn"]  # the paper's order, then the variant
    for name in REGISTERED:  # real module attributes, as @register_model leaves them
        assert getattr(registry, name).__name__ == name and getattr(registry, name).__module__ == registry.__name__


def test_families_are_table_3s_blocks_read_from_the_rows():
    assert FAMILIES == {f: [f"model-{f}", f"strided-cnn-{f}", f"convpool-cnn-{f}", f"all-cnn-{f}"] for f in "abc"}
    assert select_models("c") == FAMILIES["c"]  # all-cnn-c-bn is not in Table 3
    assert select_models(patterns=["all-cnn-c*"]) == ["all-cnn-c", "all-cnn-c-bn"]
    with pytest.raises(ValueError, match="use one of a, b, c"):
        select_models("d")


def test_paper_figures_are_optional():
    assert paper_error("all-cnn-c", {}, "cifar10", list(CIFAR10_CLASSES), "paper") == 7.25
    assert paper_error("all-cnn-c-bn", {}, "cifar10", list(CIFAR10_CLASSES), "paper") is None
    # the paper's network only: its error is not shown beside the same row built otherwise
    assert paper_error("all-cnn-c", {"batch_norm": True}, "cifar10", list(CIFAR10_CLASSES), "paper") is None
    paper_options = {"batch_norm": False, "drop_input": 0.2, "drop_rate": 0.5}  # the variant built as the paper's net
    assert paper_error("all-cnn-c-bn", paper_options, "cifar10", list(CIFAR10_CLASSES), "paper") == 7.25
    assert registry.network_name("all-cnn-c", model_options("all-cnn-c-bn")) == ("all-cnn-c-bn", False)
    (row,) = describe("all-cnn-c-bn")
    assert (row["paper_params"], row["paper_error"], row["family"]) == (None, {}, None)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_name_works_in_allconv_models(name):
    result = CliRunner().invoke(app, ["models", name.replace("_", "-"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["params"] == EXACT_PARAMS[name]


def test_models_table_lists_the_variant_with_blanks():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if line.strip().startswith("all-cnn-c-bn")]
    assert line.split() == ["all-cnn-c-bn", "1,370,996", "3x32x32", "conv1..conv9"]


@pytest.mark.parametrize("name", REGISTERED)
def test_exact_parameters(name):
    native = EXACT_PARAMS[name]
    assert n_params(create_model(name)) == native
    # K classes change only the class block: (in_chs + 1) * K parameters, or 3 K with BatchNorm.
    last = create_model(name).get_classifier()
    default_k = last.out_channels
    per_class = last.in_channels * last.kernel_size[0] ** 2 + (2 if model_options(name)["batch_norm"] else 1)
    for k in (10, 100):
        assert n_params(create_model(name, num_classes=k)) == native + (k - default_k) * per_class


def test_all_cnn_c_at_100_classes_matches_paper_md():
    assert n_params(create_model("all-cnn-c", num_classes=100)) == 1_387_108


@pytest.mark.parametrize("name", REGISTERED)
def test_forward_is_the_class_maps_averaged(name):
    """model(x) is what allconv always computed: every layer of ``features`` (the class block
    last), then the global average; forward_features / forward_head only split it."""
    model = create_model(name).eval()
    x = native_input(name, 2)
    with torch.no_grad():
        assert torch.equal(model(x), model.features(x).mean((2, 3)))
        assert torch.equal(model(x), model.forward_head(model.forward_features(x)))


# timm's model contract, as its tests/test_models.py checks it on its own models.


@pytest.mark.parametrize("name", REGISTERED)
def test_timm_default_cfg_contract(name):
    """test_model_default_cfgs: forward_features unpooled at pool_size, pre_logits, resetting the
    classifier (and the pool), and the cfg's classifier and first conv in the state dict."""
    model = create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0
    x = native_input(name)
    with torch.no_grad():
        maps = model.forward_features(x)
        pre_logits = model.forward_head(maps, pre_logits=True)
        assert maps.shape == (1, model.num_features, *cfg["pool_size"])
        assert pre_logits.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model.get_classifier().__class__ is torch.nn.Identity
        torch.testing.assert_close(model(x), pre_logits)  # (B, num_features): the pooled features
        model.reset_classifier(0, "")
        assert model(x).shape == (1, model.num_features, *cfg["pool_size"])
        unpooled = create_model(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == (1, unpooled.num_features, *cfg["pool_size"])
        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7) and model.layer_names[-1] == cfg["classifier"].split(".")[1]
    state = create_model(name).state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", REGISTERED)
def test_timm_backward(name):
    """test_model_backward: every parameter gets a gradient at another number of classes."""
    model = create_model(name, num_classes=42).train()
    out = model(native_input(name, 2))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def _fx_model(model):
    """timm's _create_fx_model (eval): torchvision's feature extractor returning the last node."""
    tracer_kwargs = {"leaf_modules": timm.models.get_notrace_modules(),
                     "autowrap_functions": timm.models.get_notrace_functions(), "param_shapes_constant": True}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", REGISTERED)
def test_timm_fx_trace_and_script(name):
    """test_model_forward_fx and test_model_forward_fx_torchscript: the traced graph computes
    the model's output, and that graph scripts; test_model_forward_torchscript: so does the model."""
    model = create_model(name).eval()
    x = native_input(name)
    with torch.no_grad():
        expected = model(x)
        traced = _fx_model(model)
        (out,) = traced(x).values()
        assert torch.equal(out, expected)
        (scripted,) = torch.jit.script(traced)(x).values()
        torch.testing.assert_close(scripted, expected)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)


@pytest.mark.parametrize("name", REGISTERED)
def test_timm_features_only(name):
    """test_model_forward_features: at least three levels, each map of the channels and at most
    the side its reduction gives; the levels are the ``feature_info`` of the full model."""
    model = timm.create_model(name, features_only=True).eval()
    full = create_model(name)
    x = native_input(name)
    with torch.no_grad():
        maps = model(x)
    assert len(maps) == len(model.feature_info.channels()) >= 3
    assert [info["module"] for info in full.feature_info] == model.feature_info.module_name()
    side = x.shape[-1]
    for m, channels, reduction in zip(maps, model.feature_info.channels(), model.feature_info.reduction()):
        assert m.shape[1] == channels and m.shape[-1] <= math.ceil(side / reduction) + 1
    # the last level is what the class conv reads: forward_features' maps
    assert maps[-1].shape[1:] == full.forward_features(x).shape[1:]


def test_strided_cnn_a_has_three_feature_levels():
    model = timm.create_model("strided_cnn_a", features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.zeros(1, 3, 32, 32))
    # conv1 16x16 (its stride is the first), conv2 8x8, conv4 6x6 (after the valid 3x3 conv)
    assert [tuple(m.shape[1:]) for m in maps] == [(96, 16, 16), (192, 8, 8), (192, 6, 6)]
    assert model.feature_info.reduction() == [2, 4, 4]


def test_timm_registration_when_timm_is_imported_after_the_package():
    code = "import allconv_cli, sys; assert 'torch' not in sys.modules; import timm; " \
           "print(timm.create_model('all_cnn_c_bn', num_classes=100).num_classes)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "100"


@pytest.mark.parametrize("name", CIFAR)
def test_forward_backward_cifar(name):
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["model_c", "strided_cnn_c", "convpool_cnn_c", "all_cnn_c"])
def test_c_family_conv7_is_6x6(name):
    model = create_model(name).eval()
    seen = {}
    model.get_layer("conv7").register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model(torch.zeros(1, 3, 32, 32))
    # conv7 is the valid 3x3 conv of ConvPool-/All-CNN-C and the class conv of Model C and
    # Strided-CNN-C (which have 7 convs): 6x6 maps either way.
    assert seen["shape"][-2:] == (6, 6)


@pytest.mark.parametrize("name", REGISTERED)
def test_layer_names_are_conv1_to_convN(name):
    model = create_model(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert model.layer_names == [f"conv{i}" for i in range(1, len(convs) + 1)]
    assert model.get_layer(model.layer_names[-1]).conv is model.get_classifier()


@pytest.mark.parametrize("name", REGISTERED)
def test_timm_create_model(name):
    model = timm.create_model(name, num_classes=100)
    assert isinstance(model, allconv_cli.AllConvNet)
    assert model.num_classes == 100
    assert model.pretrained_cfg["input_size"][0] == 3


def test_faithful_defaults_and_explicit_deviations():
    model = create_model("all-cnn-c")
    names = dict(model.features.named_children())
    assert names["input_drop"].p == 0.2
    assert names["drop1"].p == names["drop2"].p == 0.5
    assert isinstance(model.get_layer("conv9").act, torch.nn.ReLU)  # the table's "1x1 conv. 10 ReLU"
    assert model.get_layer("conv7").conv.padding == (0, 0)  # valid: 8x8 -> 6x6
    plain = create_model("all-cnn-c", class_relu=False, batch_norm=True)
    assert isinstance(plain.get_layer("conv9").act, torch.nn.Identity)
    assert isinstance(plain.get_layer("conv1").bn, torch.nn.BatchNorm2d)
    assert plain.get_layer("conv1").conv.bias is None


def test_eval_mode_turns_dropout_off():
    model = create_model("all-cnn-c").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_grayscale_and_other_sizes():
    model = create_model("all-cnn-c", in_chans=1, num_classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert model(torch.randn(1, 1, 64, 48)).shape == (1, 3)


def test_max_pool_takes_32_to_16_to_8():
    model = create_model("model-c").eval()
    shapes = {}
    for name in ("pool1", "pool2"):
        model.features.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: shapes.update({name: o.shape[-1]}))
    model(torch.zeros(1, 3, 32, 32))
    assert shapes == {"pool1": 16, "pool2": 8}


def test_reset_classifier_keeps_the_checkpoint_keys():
    model = create_model("all-cnn-c-bn")
    keys = set(model.state_dict())
    model.reset_classifier(4)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert set(model.state_dict()) == keys and "features.conv9.bn.running_mean" in keys
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        model.reset_classifier(4, "max")


def test_unknown_names_hint():
    with pytest.raises(ValueError, match="did you mean 'all-cnn-c'"):
        resolve_name("all-cnn-x")
    with pytest.raises(ValueError, match="conv1, conv2"):
        create_model("all-cnn-c").get_layer("conv10")


def test_describe_one_model():
    (row,) = describe("all-cnn-c", num_classes=100)
    assert row["params"] == 1_387_108
    by_name = {layer["name"]: layer for layer in row["layers"]}
    assert by_name["conv7"]["output"] == [192, 6, 6]
    assert by_name["global_pool"]["output"] == [100]


def test_pretrained_without_weights_names_the_variant_that_has_them():
    with pytest.raises(ValueError, match=r"all_cnn_c has no pretrained weights; all_cnn_c_bn\.cifar10 has them"):
        timm.create_model("all_cnn_c", pretrained=True)


def test_pretrained_variant_is_the_bundled_recipe():
    _, meta, _ = load_weights(BUNDLED_WEIGHTS)
    model = timm.create_model("all_cnn_c_bn")  # the variant's options without its weights
    assert {k: getattr(model, k) for k in ("batch_norm", "class_relu", "drop_rate")} == {
        k: meta["model_kwargs"][k] for k in ("batch_norm", "class_relu", "drop_rate")}
    assert model_options("all-cnn-c-bn") == {k: meta["model_kwargs"][k] for k in registry.MODEL_OPTIONS}
    assert "input_drop" not in dict(model.features.named_children())  # drop_input 0
    assert meta["preprocess"]["kind"] == "standardize"
    assert (list(BUNDLED_MEAN), list(BUNDLED_STD)) == (meta["preprocess"]["mean"], meta["preprocess"]["std"])


@pytest.mark.parametrize("num_classes", [5, 0])
def test_pretrained_with_other_classes_keeps_all_but_the_class_block(num_classes):
    tuned = timm.create_model("all_cnn_c_bn", pretrained=True, num_classes=num_classes).eval()
    bundled = timm.create_model("all_cnn_c_bn", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert tuned(x).shape == (2, num_classes or 192)
    assert torch.equal(tuned.get_layer("conv8").conv.weight, bundled.get_layer("conv8").conv.weight)
    with torch.no_grad():
        assert torch.equal(tuned.forward_features(x), bundled.forward_features(x))


def test_default_config_builds_no_model(monkeypatch):
    monkeypatch.setattr(registry, "AllConvNet", None)  # building one would now fail
    assert default_config("all-cnn-imagenet")["input_size"] == (3, 224, 224)
    assert default_config("all_cnn_c")["interpolation"] == "bilinear"
    assert default_config("all-cnn-c-bn.cifar10")["mean"] == BUNDLED_MEAN
    with pytest.raises(ValueError, match="did you mean"):
        default_config("all-cnn-x")
    with pytest.raises(ValueError, match="unknown tag 'all_cnn_c.cifar10'"):
        default_config("all_cnn_c.cifar10")


# A network's options as training builds it: the recipe's (BatchNorm, no dropout), then those its
# row states (a variant's own), then the settings given, as keyword arguments to
# timm.create_model override a model's defaults (every row and preset: test_layout.py).


@pytest.mark.parametrize("given, expected", [
    ({}, {"batch_norm": True, "class_relu": True, "drop_input": 0.0, "drop_rate": 0.25}),
    ({"batch_norm": False, "drop_rate": 0.5, "optimizer": "sgd"},
     {"batch_norm": False, "class_relu": True, "drop_input": 0.0, "drop_rate": 0.5}),
])
def test_training_settings_override_a_variants_options(given, expected):
    config = settings.resolve(None, model="all-cnn-c-bn", **given)
    assert settings.model_kwargs(config, 10) == {"num_classes": 10, **expected}
    # through config.json (a resumed run, an ablation's worker) as well
    assert settings.model_kwargs(settings.from_json(config.to_json()), 10) == settings.model_kwargs(config, 10)


def test_the_recipe_gives_a_network_the_options_its_row_leaves_open():
    recipe = {"batch_norm": True, "class_relu": True, "drop_input": 0.0, "drop_rate": 0.0}
    assert settings.model_kwargs(settings.resolve(None), 10) == {"num_classes": 10, **recipe}
    # all-cnn-imagenet's row has no input dropout; the faithful preset gives the paper's elsewhere
    assert settings.model_kwargs(settings.resolve(None, model="all-cnn-imagenet"), 3)["drop_input"] == 0.0
    assert settings.model_kwargs(settings.resolve("paper-imagenet"), 3) == {
        "num_classes": 3, "batch_norm": False, "class_relu": True, "drop_input": 0.0, "drop_rate": 0.5}
    assert settings.model_kwargs(settings.resolve("faithful"), 10) == {
        "num_classes": 10, "batch_norm": False, "class_relu": True, "drop_input": 0.2, "drop_rate": 0.5}
    # muon, the default optimizer, needs BatchNorm: a network without it is refused
    with pytest.raises(ValueError, match="optimizer muon needs batch_norm"):
        settings.resolve(None, model="all-cnn-c-bn", batch_norm=False)


def test_allconv_train_the_variant(tmp_path):
    args = ["train", "--model", "all-cnn-c-bn", "--epochs", "1", "--train-limit", "16", "--test-limit", "8",
            "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "run"), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    _, meta, _ = load_weights(tmp_path / "run" / "model.safetensors")
    assert meta["model"] == "all_cnn_c_bn" and meta["paper_error"] is None
    assert meta["model_kwargs"] == {"num_classes": 10, **model_options("all_cnn_c_bn")}


@pytest.mark.parametrize("name", list_models())
def test_a_network_is_named_as_built_and_is_the_papers_only_as_the_paper_has_it(name):
    row = registry.NETWORKS[resolve_name(name)]
    assert registry.network_name(name, {}) == registry.network_name(name, model_options(name)) == (name, row.is_papers)
    other = {"batch_norm": not model_options(name)["batch_norm"], "drop_rate": 0.125, "num_classes": 3}
    shown, papers = registry.network_name(name, other)
    assert shown.startswith(f"{name} (") and "BatchNorm" in shown and "dropout 12.5 %" in shown and not papers


def test_a_runs_first_line_and_evals_heading_name_the_network_as_built(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--epochs", "1", "--train-limit", "16", "--test-limit", "8",
                                 "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    built = "all-cnn-c (BatchNorm, input dropout 0 %, dropout 0 %)"  # the default recipe's, not the paper's net
    assert result.output.startswith(f"{built} on sample") and f"{built} on sample: 1/1 epoch" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--limit", "8", "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert f"{built} (epoch 1) on sample test" in result.output
    assert load_checkpoint(tmp_path / "run").name == built  # visualize's, sanity's and faithfulness's headings
