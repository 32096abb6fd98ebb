"""The methods beyond the paper's rules, each against its reference on the bundled All-CNN-C and
two photographs: integrated gradients, input x gradient, occlusion and SmoothGrad against
captum's, LRP against zennit's (each skipped where the library is absent) and by conservation
(always); and the settings an entry declares: checked, defaulted and seeded."""

import pytest
import torch
from torch import nn

from allconv_cli.explain import maps
from allconv_cli.explain.methods import SALIENCY_METHODS, Setting, check_settings, setting_options
from allconv_cli.explain.saliency import black_input, saliency_maps
from allconv_cli.explain.targets import select_targets
from allconv_cli.files.loading import load_checkpoint

PHOTOS = ["docs/chelsea.png", "docs/coffee.jpg"]


@pytest.fixture(scope="module")
def bundled():
    """The bundled model, two photographs as its input, their predicted classes as targets."""
    loaded = load_checkpoint(None, None, "cpu")
    _, x = loaded.read_images(PHOTOS)
    targets = select_targets(loaded.model, x, None, target_class="predicted")
    return loaded, x, targets, [t.channel for t in targets]


# captum's notes on the inputs it sets to require gradients and the hooks it sets
pytestmark = [pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
              pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")]


def captum_attr():
    return pytest.importorskip("captum.attr")


@pytest.mark.parametrize("baseline", ["black", "blur", "mean"])
def test_integrated_gradients_equal_captum(bundled, baseline):
    attr = captum_attr()
    loaded, x, targets, classes = bundled
    black = black_input(loaded)
    ours = saliency_maps(loaded.model, x, targets, "integrated-gradients", settings={"steps": 8, "baseline": baseline},
                         black=black)
    start = maps.path_start(x, baseline, black)
    theirs = attr.IntegratedGradients(loaded.model).attribute(x, baselines=start, target=classes, n_steps=8,
                                                              method="riemann_right")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert baseline == "mean" or start.abs().sum() > 0


def test_the_completeness_error_is_measured(bundled):
    """IG's report: the change of the logit from the baseline to the image, and how far the map's
    sum is from it; more steps, a smaller error."""
    loaded, x, targets, _ = bundled
    black = black_input(loaded)
    errors = []
    for steps in (4, 16):
        computed = saliency_maps(loaded.model, x, targets, "integrated-gradients", settings={"steps": steps},
                                 black=black)
        report = maps.completeness(loaded.model, x, targets, computed, steps=steps, baseline="black", black=black)
        with torch.no_grad():
            change = loaded.model(x)[range(2), [t.channel for t in targets]] - loaded.model(black)[0, [
                t.channel for t in targets]]
        torch.testing.assert_close(report["baseline_to_image"], change)
        torch.testing.assert_close(report["completeness_error"], (computed.flatten(1).sum(1) - change).abs())
        errors.append(report["completeness_error"].mean().item())
    assert errors[1] < errors[0]


def test_input_x_gradient_and_occlusion_equal_captum(bundled):
    attr = captum_attr()
    loaded, x, targets, classes = bundled
    ours = saliency_maps(loaded.model, x, targets, "input-x-gradient")
    torch.testing.assert_close(ours, attr.InputXGradient(loaded.model).attribute(x.clone(), target=classes))
    for window, stride in ((8, 5), (5, 5), (32, 32)):  # the last window runs past the edge; overlapping; one
        ours = saliency_maps(loaded.model, x, targets, "occlusion", settings={"window": window, "stride": stride})
        theirs = attr.Occlusion(loaded.model).attribute(x, sliding_window_shapes=(3, window, window),
                                                        strides=(3, stride, stride), target=classes, baselines=0)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("of", ["backprop", "guided", "input-x-gradient"])
def test_smoothgrad_equals_noise_tunnel_given_the_same_noise(bundled, of, monkeypatch):
    """captum draws its noise with torch.normal; given ours (the generator's draws, copy by copy),
    NoiseTunnel over the same method gives the same map."""
    attr = captum_attr()
    loaded, x, targets, classes = bundled
    x, samples, noise, seed = x[:1], 5, 0.2, 3
    ours = saliency_maps(loaded.model, x, targets[:1], "smoothgrad",
                         settings={"of": of, "samples": samples, "noise": noise, "seed": seed})
    generator = torch.Generator().manual_seed(seed)
    draws = torch.cat([torch.randn(x.shape, generator=generator) for _ in range(samples)])
    monkeypatch.setattr(torch, "normal", lambda mean, std: draws * std)
    method = {"backprop": attr.Saliency, "guided": attr.GuidedBackprop, "input-x-gradient": attr.InputXGradient}[of]
    options = {"abs": False} if of == "backprop" else {}
    theirs = attr.NoiseTunnel(method(loaded.model)).attribute(
        x, nt_type="smoothgrad", nt_samples=samples, stdevs=noise * (x.max() - x.min()).item(), target=classes[0],
        **options)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    again = saliency_maps(loaded.model, x, targets[:1], "smoothgrad",
                          settings={"of": of, "samples": samples, "noise": noise, "seed": seed})
    torch.testing.assert_close(again, ours, rtol=0, atol=0)  # the seed fixes the noise
    other = saliency_maps(loaded.model, x, targets[:1], "smoothgrad", settings={"of": of, "seed": seed + 1})
    assert not torch.equal(other, ours)


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_lrp_equals_zennit(bundled, rule):
    """zennit's rules (Epsilon or ZPlus at every conv, Pass at ReLUs, Norm at the global average),
    each BatchNorm merged into its conv by zennit's canonizer, the logit's value as the start."""
    pytest.importorskip("zennit")
    from zennit import types
    from zennit.attribution import Gradient
    from zennit.canonizers import NamedMergeBatchNorm
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Norm, Pass, ZPlus

    loaded, x, targets, classes = bundled
    model = loaded.model
    pooled = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()  # the same function
    merge = NamedMergeBatchNorm([([f"0.{name}.conv"], f"0.{name}.bn") for name in model.layer_names])
    conv = Epsilon(1e-6) if rule == "epsilon" else ZPlus(1e-6)
    composite = LayerMapComposite(layer_map=[(types.Convolution, conv), (types.Activation, Pass()),
                                             (types.AvgPool, Norm(1e-6))], canonizers=[merge])
    with Gradient(model=pooled, composite=composite) as attributor:
        _, theirs = attributor(x, lambda out: torch.eye(10)[classes] * out)
    ours = saliency_maps(model, x, targets, "lrp", settings={"rule": rule, "epsilon": 1e-6})
    # BatchNorm folded by torch.fx here, by zennit there: float32 rounding, amplified by the divisions
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3 * theirs.abs().max().item())
    assert torch.equal(model.features.conv1.bn.running_mean, loaded.model.features.conv1.bn.running_mean)


class BiasFree(nn.Module):
    """Three convs without biases, each followed by the same kind of ReLU, then a global average:
    nothing absorbs relevance, so LRP conserves it exactly but for the epsilons."""

    def __init__(self, relu):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 6, 3, padding=1, bias=False),
                                    nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False),
                                    nn.Conv2d(6, 4, 1, bias=False)])
        self.relu = relu

    def forward(self, x):
        for conv in self.convs:
            x = self.relu(conv(x))
        return x.mean((2, 3))


def test_lrp_conserves_relevance_at_every_spelling_of_relu():
    """The map sums to the explained logit (relative 1e-4: the epsilons' share), and every way of
    calling a ReLU gets the rule, as the paper's rules do."""
    from tests.test_saliency import RELUS

    torch.manual_seed(0)
    reference = BiasFree(nn.ReLU()).eval()
    x = torch.randn(3, 3, 8, 8)
    targets = select_targets(reference, x, target_class="predicted")
    logits = torch.tensor([t.value for t in targets])
    for rule in ("epsilon", "zplus"):
        expected = saliency_maps(reference, x, targets, "lrp", settings={"rule": rule})
        torch.testing.assert_close(expected.flatten(1).sum(1), logits, rtol=1e-4, atol=0)
        for kind, relu in RELUS.items():
            twin = BiasFree(relu).eval()
            twin.load_state_dict(reference.state_dict())
            torch.testing.assert_close(saliency_maps(twin, x, targets, "lrp", settings={"rule": rule}), expected,
                                       rtol=0, atol=0, msg=kind)


class Residual(nn.Module):
    """A conv whose output is added to its input: a branch LRP's rules here do not cover."""

    def __init__(self, inplace):
        super().__init__()
        self.conv, self.inplace = nn.Conv2d(3, 3, 3, padding=1), inplace

    def forward(self, x):
        y = self.conv(x)
        if self.inplace:
            y += x
        else:
            y = y + x
        return y.relu().mean((2, 3))


def test_lrp_refuses_what_its_rules_do_not_cover():
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 2, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="uses Gelu, not a ReLU: the lrp rule is defined at ReLUs only"):
        saliency_maps(gelu, x, select_targets(gelu, x, target_class=0), "lrp")
    for inplace in (False, True):
        residual = Residual(inplace).eval()
        with pytest.raises(ValueError, match="lrp: the model adds two branches"):
            saliency_maps(residual, x, select_targets(residual, x, target_class=0), "lrp")


def test_settings_are_checked_and_defaulted():
    entry = SALIENCY_METHODS["integrated-gradients"]
    assert entry.resolve("integrated-gradients") == {"steps": 32, "baseline": "black"}
    with pytest.raises(ValueError, match="--ig-steps 0: give 1 to 4096"):
        entry.resolve("integrated-gradients", {"steps": 0})
    with pytest.raises(ValueError, match="--ig-baseline 'white': choose from black, blur, mean"):
        entry.resolve("integrated-gradients", {"baseline": "white"})
    with pytest.raises(ValueError, match="--smoothgrad-samples sets smoothgrad, which is not among the methods"):
        check_settings(["guided"], {"smoothgrad": {"samples": 4}})
    assert check_settings(["guided", "occlusion"], None) == {"guided": {}, "occlusion": {"window": 8, "stride": 4}}
    assert Setting("n", 3, "How many.", 1).describe() == "How many. Default: 3; at least 1."
    assert "--ig-steps" in setting_options() and "--lrp-rule" in setting_options()


def test_occlusion_windows_are_bounded(bundled):
    loaded, x, targets, _ = bundled
    for settings, message in (({"window": 33}, "--occlusion-window 33: give at most 32"),
                              ({"window": 4, "stride": 5}, "--occlusion-stride 5: give at most the window, 4")):
        with pytest.raises(ValueError, match=message):
            saliency_maps(loaded.model, x, targets, "occlusion", settings=settings)
