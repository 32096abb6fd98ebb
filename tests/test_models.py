import subprocess
import sys

import pytest
import timm
import torch

import allconv_cli
from allconv_cli.files.weights import load_weights
from allconv_cli.models import (
    BUNDLED_MEAN,
    BUNDLED_STD,
    BUNDLED_WEIGHTS,
    LAYERS,
    VARIANTS,
    create_model,
    default_config,
    describe,
    list_models,
    resolve_name,
)

# Exact weights + biases, worked out by hand from PAPER.md's layer lists.
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
}
CIFAR = [name for name in LAYERS if name != "all_cnn_imagenet"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_is_the_paper():
    assert set(LAYERS) == set(EXACT_PARAMS)
    assert list_models()[-1] == "all-cnn-imagenet"


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_exact_parameters(name):
    native = EXACT_PARAMS[name]
    assert n_params(create_model(name)) == native
    # K classes change only the class conv: (in_chs + 1) * K parameters.
    last = create_model(name).get_classifier()
    default_k = last.out_channels
    for k in (10, 100):
        expected = native + (k - default_k) * (last.in_channels * last.kernel_size[0] ** 2 + 1)
        assert n_params(create_model(name, num_classes=k)) == expected


def test_all_cnn_c_at_100_classes_matches_paper_md():
    assert n_params(create_model("all-cnn-c", num_classes=100)) == 1_387_108


@pytest.mark.parametrize("name", CIFAR)
def test_forward_backward_cifar(name):
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_forward_backward_imagenet():
    model = create_model("all-cnn-imagenet", num_classes=5)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 5)
    out.sum().backward()
    assert model.get_layer("conv1").conv.weight.grad is not None


@pytest.mark.parametrize("name", ["model_c", "strided_cnn_c", "convpool_cnn_c", "all_cnn_c"])
def test_c_family_conv7_is_6x6(name):
    model = create_model(name).eval()
    seen = {}
    model.get_layer("conv7").register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model(torch.zeros(1, 3, 32, 32))
    # conv7 is the valid 3x3 conv of ConvPool-/All-CNN-C and the class conv of Model C and
    # Strided-CNN-C (which have 7 convs): 6x6 maps either way.
    assert seen["shape"][-2:] == (6, 6)


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_layer_names_are_conv1_to_convN(name):
    model = create_model(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert model.layer_names == [f"conv{i}" for i in range(1, len(convs) + 1)]
    assert model.get_layer(model.layer_names[-1]).conv is model.get_classifier()


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_timm_create_model(name):
    model = timm.create_model(name, num_classes=100)
    assert isinstance(model, allconv_cli.AllConvNet)
    assert model.num_classes == 100
    assert model.pretrained_cfg["input_size"][0] == 3


def test_timm_registration_when_timm_is_imported_after_the_package():
    code = "import allconv_cli, sys; assert 'torch' not in sys.modules; import timm; " \
           "print(timm.create_model('all_cnn_c', num_classes=100).num_classes)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "100"


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


def test_reset_classifier():
    model = create_model("all-cnn-c")
    model.reset_classifier(4)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


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


@pytest.mark.parametrize("name", [*LAYERS, *VARIANTS])
def test_features_only(name):
    cfg = default_config(name)
    model = timm.create_model(name, features_only=True).eval()
    side = cfg["input_size"][1]
    with torch.no_grad():
        maps = model(torch.zeros(1, *cfg["input_size"]))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    for m, reduction in zip(maps, model.feature_info.reduction()):
        # the valid 3x3 conv takes 8x8 to 6x6 without a stride: at most the stride's side
        assert side // reduction - 2 <= m.shape[-1] <= side // reduction
    assert model.feature_info.reduction()[-1] == (32 if name == "all_cnn_imagenet" else 4)


def test_pretrained_without_weights_names_the_variant_that_has_them():
    with pytest.raises(ValueError, match=r"all_cnn_c has no pretrained weights; all_cnn_c_bn\.cifar10 has them"):
        timm.create_model("all_cnn_c", pretrained=True)


def test_pretrained_variant_is_the_bundled_recipe():
    _, meta, _ = load_weights(BUNDLED_WEIGHTS)
    model = timm.create_model("all_cnn_c_bn")  # the variant's options without its weights
    assert {k: getattr(model, k) for k in ("batch_norm", "class_relu", "drop_rate")} == {
        k: meta["model_kwargs"][k] for k in ("batch_norm", "class_relu", "drop_rate")}
    assert "input_drop" not in dict(model.features.named_children())  # drop_input 0
    assert meta["preprocess"]["kind"] == "standardize"
    assert (list(BUNDLED_MEAN), list(BUNDLED_STD)) == (meta["preprocess"]["mean"], meta["preprocess"]["std"])


def test_pretrained_with_other_classes_keeps_all_but_the_class_block():
    tuned = timm.create_model("all_cnn_c_bn", pretrained=True, num_classes=5)
    bundled = timm.create_model("all_cnn_c_bn", pretrained=True)
    assert tuned(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    assert torch.equal(tuned.get_layer("conv8").conv.weight, bundled.get_layer("conv8").conv.weight)


def test_default_config_builds_no_model(monkeypatch):
    import allconv_cli.models.registry as registry

    monkeypatch.setattr(registry, "AllConvNet", None)  # building one would now fail
    assert default_config("all-cnn-imagenet")["input_size"] == (3, 224, 224)
    assert default_config("all_cnn_c")["interpolation"] == "bilinear"
    assert default_config("all_cnn_c_bn")["mean"] == BUNDLED_MEAN
    with pytest.raises(ValueError, match="did you mean"):
        default_config("all-cnn-x")
