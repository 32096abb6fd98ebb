"""The saliency library: the paper's three rules, neuron selection, Grad-CAM, receptive fields
and the top-patch scan, on tiny networks and inputs (the whole file runs in seconds on a CPU)."""

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from allconv_cli.data.images import load_images
from allconv_cli.data.preprocess import Standardize
from allconv_cli.explain import maps, saliency
from allconv_cli.explain.methods import PAPER_METHODS, SALIENCY_METHODS, Method, fitting
from allconv_cli.explain.saliency import saliency_maps
from allconv_cli.explain.scan import ReceptiveField, receptive_field, top_patches
from allconv_cli.explain.targets import Target, select_targets
from allconv_cli.files import loading
from allconv_cli.files.loading import load_checkpoint
from allconv_cli.models import AllConvNet, create_model


def tiny(pool=False):
    """All-CNN-C's layout at 1/12 of its width (8 and 16), built by the same class: conv1..conv7,
    4 classes; on 16x16 input conv4's map is 4x4 and the class map 2x2. With ``pool``, Model C's
    max-pools replace the stride-2 convs (conv1..conv5)."""
    down = [["M"], ["M"]] if pool else [[(3, 8, 2), "D"], [(3, 16, 2), "D"]]
    layers = [(3, 8, 1), *down[0], (3, 16, 1), *down[1], (3, 16, 1, 0), (1, 16, 1), (1, None, 1)]
    return AllConvNet(layers, num_classes=4)


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _relu_then_return(method):
    def call(x):
        method(x)  # the result is ignored: only the in-place effect counts
        return x
    return call


# Every way a model may call its ReLUs; each must get the rule.
RELUS = {
    "nn.ReLU": nn.ReLU(),
    "nn.ReLU(inplace=True)": nn.ReLU(inplace=True),
    "F.relu": F.relu,
    "F.relu(inplace=True)": lambda x: F.relu(x, inplace=True),
    "torch.relu": torch.relu,
    "torch.relu_": _relu_then_return(torch.relu_),
    "x.relu()": lambda x: x.relu(),
    "x.relu_()": _relu_then_return(torch.Tensor.relu_),
    "F.threshold(x, 0, 0)": lambda x: F.threshold(x, 0.0, 0.0),
    "F.threshold(x, 0, 0, inplace=True)": lambda x: F.threshold(x, 0.0, 0.0, inplace=True),
}


class Toy(nn.Module):
    """x (2) -> linear W1 (3x2) -> ReLU -> linear W2 (1x3): 1x1 convs on a 1x1 image."""

    def __init__(self, relu):
        super().__init__()
        self.fc1 = nn.Conv2d(2, 3, 1, bias=False)
        self.fc2 = nn.Conv2d(3, 1, 1, bias=False)
        self.relu = relu
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]).view(3, 2, 1, 1))
            self.fc2.weight.copy_(torch.tensor([1.0, 2.0, -3.0]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x))).flatten(1)  # (B, 1) logits


@pytest.mark.parametrize("kind", list(RELUS))
def test_each_rule_by_hand(kind):
    # x = (1, 1): f = W1 x = (1, -1, 2) at the ReLU; R = W2 = (1, 2, -3) comes down to it.
    # backprop  (f > 0) R          = (1, 0, -3) -> W1^T: (1 - 3, 0 - 3) = (-2, -3)
    # deconvnet (R > 0) R          = (1, 2, 0)  -> W1^T: (1, -2)
    # guided    (f > 0)(R > 0) R   = (1, 0, 0)  -> W1^T: (1, 0)
    model = Toy(RELUS[kind]).eval()
    x = torch.ones(1, 2, 1, 1)
    targets = select_targets(model, x, target_class=0)
    assert targets == [Target(0, None, 0, None, None, 1 * 1 + 2 * 0 - 3 * 2)]
    expected = {"backprop": [-2.0, -3.0], "deconvnet": [1.0, -2.0], "guided": [1.0, 0.0]}
    for method, values in expected.items():
        exact(saliency_maps(model, x, targets, method), torch.tensor(values).view(1, 2, 1, 1))


class Twin(nn.Module):
    """Three convs, each followed by the same kind of ReLU, then a global average."""

    def __init__(self, relu):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 1)
        self.relu = relu

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            x = self.relu(conv(x))
        return x.mean((2, 3))


def test_inplace_and_functional_relus_match_their_nn_relu_twin():
    torch.manual_seed(0)
    reference = Twin(nn.ReLU()).eval()
    x = torch.randn(3, 3, 8, 8)
    targets = select_targets(reference, x, target_class="predicted")
    expected = {m: saliency_maps(reference, x, targets, m) for m in PAPER_METHODS}
    assert not torch.equal(expected["guided"], expected["backprop"])
    for kind, relu in RELUS.items():
        twin = Twin(relu).eval()
        twin.load_state_dict(reference.state_dict())
        for method in PAPER_METHODS:
            exact(saliency_maps(twin, x, targets, method), expected[method])


def _reference_map(model, x, method, layer=None, neuron=None, target_class=None):
    """The rules as backward hooks on non-inplace nn.ReLU modules: an independent route."""
    rule = {"guided": lambda m, grad_in, grad_out: (grad_in[0].clamp(min=0),),
            "deconvnet": lambda m, grad_in, grad_out: (grad_out[0].clamp(min=0),)}.get(method)
    handles = [m.register_full_backward_hook(rule) for m in model.modules()
               if isinstance(m, nn.ReLU) and rule is not None]
    captured = []
    if layer is not None:
        handles.append(model.get_submodule(layer).register_forward_hook(lambda m, a, out: captured.append(out)))
    try:
        x = x.clone().requires_grad_(True)
        logits = model(x)
        root = captured[0] if layer is not None else logits
        seed = torch.zeros_like(root)
        if layer is not None:
            seed[(slice(None), *neuron)] = 1
        else:
            seed[:, target_class] = 1
        return torch.autograd.grad(root, x, seed)[0]
    finally:
        for handle in handles:
            handle.remove()


def test_every_relu_of_all_cnn_c_gets_the_rule():
    torch.manual_seed(1)
    model = create_model("all-cnn-c").eval()
    x = torch.randn(2, 3, 16, 16)
    neuron = (5, 1, 2)  # conv6's map is 4x4 at 16x16 input
    neurons = select_targets(model, x, "conv6", neuron=neuron)
    classes = select_targets(model, x, target_class=3)
    for method in PAPER_METHODS:
        exact(saliency_maps(model, x, neurons, method),
              _reference_map(model, x, method, layer="features.conv6", neuron=neuron))
        exact(saliency_maps(model, x, classes, method), _reference_map(model, x, method, target_class=3))


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_resnet18_with_inplace_relus(library):
    import timm
    import torchvision

    torch.manual_seed(2)
    model = (timm.create_model("resnet18", num_classes=5) if library == "timm"
             else torchvision.models.resnet18(num_classes=5)).eval()
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    plain = copy.deepcopy(model)  # the reference needs non-inplace ReLUs for its hooks
    for m in plain.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(1, 3, 16, 16)
    targets = select_targets(model, x, target_class=1)
    for method in PAPER_METHODS:
        torch.testing.assert_close(saliency_maps(model, x, targets, method),
                                   _reference_map(plain, x, method, target_class=1))


def test_deconvnet_ignores_the_image_without_max_pooling():
    # The deconvnet rule never looks at f, so without pooling switches (All-CNN) a neuron's
    # reconstruction is the same for every image; max-pooling (Model C's layout) conditions it.
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    for pool in (False, True):
        model = tiny(pool).eval()
        targets = select_targets(model, x, model.layer_names[-3], neuron=(4, 1, 1))  # the 2x2 valid conv
        maps = {m: saliency_maps(model, x, targets, m) for m in PAPER_METHODS}
        assert torch.equal(maps["deconvnet"][0], maps["deconvnet"][1]) is not pool
        assert not torch.equal(maps["guided"][0], maps["guided"][1])
        assert not torch.equal(maps["guided"], maps["deconvnet"])
        # guided keeps only what both other rules keep, so it is zero wherever backprop is
        assert bool((maps["guided"][maps["backprop"] == 0] == 0).all())


def test_the_model_is_left_exactly_as_it_was():
    torch.manual_seed(4)
    model = tiny().train()
    model.get_layer("conv2").eval()
    user_hook = model.get_layer("conv1").register_forward_hook(lambda m, a, out: None)
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for m in model.modules()]
    x = torch.randn(2, 3, 16, 16)
    neurons = select_targets(model, x, "conv4", top_channels=2)
    classes = select_targets(model, x, target_class="predicted")
    for method, entry in SALIENCY_METHODS.items():
        saliency_maps(model, x, classes if entry.needs_class else neurons, method, cam_layer="conv6",
                      black=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="not a \\(B, C, H, W\\) feature map"):
        select_targets(nn.Sequential(model, nn.Flatten()), x, "1")  # fails inside the forward
    assert [m.training for m in model.modules()] == modes
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for m in model.modules()] == hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert F.relu(torch.tensor([-1.0])).grad_fn is None and torch.relu is torch._C._VariableFunctions.relu
    user_hook.remove()


def test_activations_outside_the_rules_are_refused():
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 2, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()).eval()

    class Hidden(nn.Module):  # a ReLU through torch.ops, below the function mode
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return torch.ops.aten.relu(self.conv(x)).mean((2, 3))

    x = torch.randn(1, 3, 6, 6)
    targets = select_targets(gelu, x, target_class=0)
    assert saliency_maps(gelu, x, targets, "backprop").shape == x.shape  # the plain gradient is fine
    for method in ("deconvnet", "guided"):
        with pytest.raises(ValueError, match="uses Gelu, not a ReLU"):
            saliency_maps(gelu, x, targets, method)
    hidden = Hidden().eval()
    with pytest.raises(ValueError, match="cannot reach"):
        saliency_maps(hidden, x, select_targets(hidden, x, target_class=0), "guided")


def _activation(model, x, layer):
    names = [name for name, _ in model.features.named_children()]
    with torch.no_grad():
        return model.features[: names.index(layer) + 1](x)


def test_neuron_selection_modes():
    torch.manual_seed(5)
    model = tiny().eval()
    x = torch.randn(3, 3, 16, 16)
    act = _activation(model, x, "conv4")  # (3, 16, 4, 4)
    for i, t in enumerate(select_targets(model, x, "conv4")):
        assert (t.image, t.layer) == (i, "conv4")
        assert t.value == act[i].max().item() == act[i, t.channel, t.y, t.x].item()
    rows = select_targets(model, x, "conv4", channels=[7, 11])
    assert [(t.image, t.channel) for t in rows] == [(0, 7), (0, 11), (1, 7), (1, 11), (2, 7), (2, 11)]
    assert all(act[t.image, t.channel, t.y, t.x] == act[t.image, t.channel].max() for t in rows)
    assert [t.value for t in select_targets(model, x, "conv4", neuron=(9, 2, 3))] == act[:, 9, 2, 3].tolist()
    top3 = select_targets(model, x, "conv4", top_channels=3)[:3]
    assert [t.channel for t in top3] == act[0].amax((1, 2)).topk(3).indices.tolist()
    assert [t.value for t in top3] == sorted((t.value for t in top3), reverse=True)
    with torch.no_grad():
        logits = model(x)
    assert [t.channel for t in select_targets(model, x, target_class="predicted")] == logits.argmax(1).tolist()
    assert [t.value for t in select_targets(model, x, target_class=2)] == logits[:, 2].tolist()
    assert select_targets(model, x)[0].layer == "conv7"  # default: the last conv layer (Fig. 4)
    # each map starts from its own row's neuron: backprop is that neuron's plain gradient
    maps = saliency_maps(model, x, rows, "backprop")
    for row, t in enumerate(rows):
        xi = x[t.image:t.image + 1].clone().requires_grad_(True)
        value = model.features[:7](xi)[0, t.channel, t.y, t.x]  # input_drop .. conv4
        torch.testing.assert_close(maps[row], torch.autograd.grad(value, xi)[0][0])
    for kwargs, message in (({"channels": [16]}, "channel 16 is out of range"),
                            ({"neuron": (1, 4, 0)}, "neuron y 4 is out of range"),
                            ({"top_channels": 0}, "give 1 to 16"),
                            ({"target_class": 4}, "class 4 is out of range"),
                            ({"neuron": (1, 1, 1), "target_class": 0}, "--neuron and --class")):
        with pytest.raises(ValueError, match=message):
            select_targets(model, x, "conv4", **kwargs)
    with pytest.raises(ValueError, match="did you mean 'conv4'"):
        select_targets(model, x, "conv44")


def test_gradcam_on_the_class_conv_is_the_class_map():
    # logit_c = mean over the h x w class map A_c (post-ReLU), so d logit_c / dA = 1/(hw) on
    # channel c and 0 elsewhere: Grad-CAM on the class conv is ReLU(A_c / hw), upsampled.
    torch.manual_seed(6)
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    targets = select_targets(model, x, target_class=1)
    cam = saliency_maps(model, x, targets, "gradcam", cam_layer="conv7")
    class_map = _activation(model, x, "conv7")[:, 1:2]  # (2, 1, 2, 2)
    expected = F.interpolate(class_map / 4, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cam, expected)
    other = saliency_maps(model, x, select_targets(model, x, target_class=2), "gradcam", cam_layer="conv7")
    assert not torch.allclose(cam, other)
    guided = saliency_maps(model, x, targets, "guided")
    exact(saliency_maps(model, x, targets, "guided-gradcam", cam_layer="conv6"),
          guided * saliency_maps(model, x, targets, "gradcam", cam_layer="conv6"))
    with pytest.raises(ValueError, match="explains a class score"):
        saliency_maps(model, x, select_targets(model, x, "conv4"), "gradcam")


def test_receptive_fields():
    model = create_model("all-cnn-c")
    assert receptive_field(model, "conv1") == ReceptiveField((3, 3), (1, 1), (-1, -1))
    assert receptive_field(model, "conv3") == ReceptiveField((7, 7), (2, 2), (-3, -3))
    assert receptive_field(model, "conv6") == ReceptiveField((19, 19), (4, 4), (-9, -9))
    assert receptive_field(model, "conv9").size == (27, 27)  # the valid 3x3 conv7 adds 2 x 4
    assert receptive_field(create_model("model-c"), "conv4") == ReceptiveField((15, 15), (2, 2), (-7, -7))
    # With positive weights every ReLU is open, so a neuron's gradient covers its whole window.
    positive = model.eval()
    with torch.no_grad():
        for p in positive.parameters():
            p.abs_()
    x = torch.rand(1, 3, 32, 32)
    rf = receptive_field(positive, "conv6")
    neurons = ((0, 0), (3, 5), (7, 7))
    grads = saliency_maps(positive, x, [Target(0, "conv6", 0, y, xx, 0.0) for y, xx in neurons], "backprop")
    for (y, xx), grad in zip(neurons, grads.abs().sum(1)):
        top, left = rf.window(y, xx)
        expected = torch.zeros(32, 32, dtype=torch.bool)
        expected[max(top, 0):top + 19, max(left, 0):left + 19] = True
        assert torch.equal(grad > 0, expected), (y, xx)
    import timm

    with pytest.raises(ValueError, match="allconv's own networks"):
        receptive_field(timm.create_model("resnet18"), "layer4")


def _batches(images, labels, sizes):
    start = 0
    for size in sizes:
        yield images[start:start + size], labels[start:start + size]
        start += size


def test_top_patches_match_brute_force():
    torch.manual_seed(7)
    model = tiny().eval()
    pre = Standardize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    images = torch.randint(0, 256, (23, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(23) % 10
    result = top_patches(model, pre, _batches(images, labels, [5, 7, 11]), "conv4", [3, 12], top=4)
    assert result.scanned == 23 and result.channels == [3, 12]
    act = _activation(model, pre(images.float() / 255), "conv4")  # (23, 16, 4, 4)
    for s, c in enumerate([3, 12]):
        best = act[:, c].flatten(1).max(1)
        order = best.values.topk(4).indices
        assert result.indices[s].tolist() == order.tolist()
        exact(result.values[s], best.values[order])
        assert result.labels[s].tolist() == labels[order].tolist()
        positions = [divmod(p, 4) for p in best.indices[order].tolist()]
        assert [tuple(p) for p in result.positions[s].tolist()] == positions
    # crops: the receptive field window, grey (image) or 0 (map) where it leaves the image
    rf = result.field
    # conv1 3x3 -> 3 px; conv2 3x3/2 -> 5; conv3 3x3 at stride 2 -> 9; conv4 3x3/2 -> 13 px, stride 4
    assert rf == ReceptiveField((13, 13), (4, 4), (-6, -6))
    s, j = 1, 2
    n, (y, x) = result.indices[s, j].item(), result.positions[s, j].tolist()
    top, left = rf.window(y, x)
    window = (slice(None), slice(top + 13, top + 26), slice(left + 13, left + 26))
    exact(result.patches[s, j], F.pad(images[n].float() / 255, (13,) * 4, value=0.5)[window])
    inputs = pre(images[n:n + 1].float() / 255)
    full = saliency_maps(model, inputs, [Target(0, "conv4", 12, y, x, 0.0)], "guided")[0]
    torch.testing.assert_close(result.maps["guided"][s, j], F.pad(full, (13,) * 4)[window])
    # batching does not matter
    again = top_patches(model, pre, _batches(images, labels, [23]), "conv4", [3, 12], top=4)
    assert torch.equal(again.indices, result.indices)
    with pytest.raises(ValueError, match="uint8"):
        top_patches(model, pre, [(images.float(), labels)], "conv4", [3])
    with pytest.raises(ValueError, match="explain class scores"):
        top_patches(model, pre, [(images, labels)], "conv4", [3], methods=["gradcam"])


def test_top_patches_read_the_real_iter_batches():
    from allconv_cli.data.datasets import iter_batches

    model = tiny().eval()
    pre = Standardize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    batches = itertools.islice(iter_batches("sample", None, "test", (3, 16, 16), 16), 2)
    result = top_patches(model, pre, batches, "conv2", None, top=3)
    assert result.scanned == 32 and result.channels == list(range(8))  # default: the first 8 filters
    assert result.patches.shape == (8, 3, 3, 5, 5)  # conv2 sees 5x5 pixels


def test_load_images_cover_then_center_crop(tmp_path):
    # 40 wide x 20 high: red | green | blue in columns 0-9 | 10-29 | 30-39. Scaled to 16
    # high (32 wide) and center-cropped to 16 wide, only the green middle remains.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10, 0] = pixels[:, 10:30, 1] = pixels[:, 30:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    batch = load_images([tmp_path / "wide.png"], (3, 16, 16))
    assert batch.shape == (1, 3, 16, 16) and batch.dtype == torch.float32
    assert batch[0, 1, :, 2:14].min() > 0.95 and batch[0, 0, :, 2:14].max() < 0.05
    assert load_images([tmp_path / "wide.png"], (1, 8, 12)).shape == (1, 1, 8, 12)
    (tmp_path / "bad.jpg").write_bytes(b"no image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_images([tmp_path / "wide.png", tmp_path / "bad.jpg"], (3, 16, 16))


def test_load_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "BUNDLED_CHECKPOINT", tmp_path / "assets" / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        load_checkpoint()
    import torchvision

    net = torchvision.models.squeezenet1_1(num_classes=1000)  # timm has no squeezenet
    save_file(net.state_dict(), str(tmp_path / "squeeze.safetensors"))
    loaded = load_checkpoint(tmp_path / "squeeze.safetensors", "squeezenet1_1")
    assert loaded.input_size == (3, 224, 224) and loaded.classes is None
    exact(loaded.preprocess.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        load_checkpoint(tmp_path / "squeeze.safetensors", "resnet18")
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        load_checkpoint(tmp_path / "squeeze.safetensors", "resnet81")
    with pytest.raises(ValueError, match="needs --checkpoint"):
        load_checkpoint(None, "resnet18")


# --------------------------------------------------------------------------- exactness


class _Rule(torch.autograd.Function):
    """The reference: a ReLU whose backward applies one of the paper's rules, written out."""

    @staticmethod
    def forward(ctx, f, rule):
        ctx.rule = rule
        ctx.save_for_backward(f)
        return f.clamp(min=0)

    @staticmethod
    def backward(ctx, r):
        (f,) = ctx.saved_tensors
        mask = {"backprop": f > 0, "deconvnet": r > 0, "guided": (f > 0) & (r > 0)}[ctx.rule]
        return r * mask, None


class ThreeWays(nn.Module):
    """conv -> ReLU -> conv /2 -> ReLU -> max-pool -> conv -> ReLU -> 1x1 class conv -> mean,
    with the ReLUs spelled as ``kind`` says, or (``rule``) replaced by the reference ``_Rule``."""

    def __init__(self, kind: str, rule: str | None = None):
        super().__init__()
        self.kind, self.rule = kind, rule
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)
        self.relu = nn.ReLU(inplace=kind == "inplace")  # one module, called three times

    def act(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.rule is not None:
            return _Rule.apply(x, self.rule)
        if self.kind == "functional":
            return (F.relu, torch.relu, torch.Tensor.relu)[i](x)
        if self.kind == "inplace" and i == 1:
            return F.relu_(x)  # the in-place functional spelling too
        return self.relu(x)  # reused (and in-place) nn.ReLU

    def forward(self, x):
        x = self.act(self.conv1(x), 0)
        x = F.max_pool2d(self.act(self.conv2(x), 1), 2)
        return self.head(self.act(self.conv3(x), 2)).mean((2, 3))


def _three_ways(kind: str, rule: str | None = None) -> ThreeWays:
    torch.manual_seed(11)  # the same weights for every kind and the reference
    return ThreeWays(kind, rule).eval()


def _reference(x: torch.Tensor, rule: str, target_class: int) -> torch.Tensor:
    reference = _three_ways("reused", rule)
    x = x.clone().requires_grad_(True)
    logits = reference(x)
    return torch.autograd.grad(logits[:, target_class].sum(), x)[0]


@pytest.mark.parametrize("kind", ["reused", "functional", "inplace"])
def test_each_spelling_of_relu_against_the_reference_rule(kind):
    model = _three_ways(kind)
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(12))
    targets = select_targets(model, x, target_class=2)
    maps = {rule: saliency_maps(model, x, targets, rule) for rule in PAPER_METHODS}
    for rule in PAPER_METHODS:
        exact(maps[rule], _reference(x, rule, 2))
    assert not torch.equal(maps["guided"], maps["backprop"]) and not torch.equal(maps["guided"], maps["deconvnet"])
    # the plain gradient is what autograd gives without any rule
    xg = x.clone().requires_grad_(True)
    exact(maps["backprop"], torch.autograd.grad(_three_ways(kind)(xg)[:, 2].sum(), xg)[0])


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_captum_gets_functional_relus_wrong_and_modules_right():
    """captum hooks nn.ReLU modules only: where F.relu / torch.relu / F.relu_ are called
    (functional; inplace has one F.relu_ among in-place nn.ReLU calls) its guided backprop and
    deconvnet are other maps; with one nn.ReLU module called three times it agrees with ours."""
    captum_attr = pytest.importorskip("captum.attr")
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(13))
    for kind in ("functional", "reused", "inplace"):
        model = _three_ways(kind)
        targets = select_targets(model, x, target_class=1)
        for rule, tool in (("guided", captum_attr.GuidedBackprop), ("deconvnet", captum_attr.Deconvolution)):
            ours = saliency_maps(model, x, targets, rule)
            exact(ours, _reference(x, rule, 1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # captum's notes on hooks and requires_grad
                theirs = tool(model).attribute(x.clone(), target=1)
            if kind == "reused":
                torch.testing.assert_close(theirs, ours)
            else:
                assert _relative_l2(theirs, ours) > 0.1, (kind, rule)


def test_precision_fp32_by_default_and_bf16_on_request(tmp_path):
    model = tiny().eval()
    loaded = loading.LoadedModel(model, Standardize([0.5] * 3, [0.25] * 3), (3, 16, 16), None, "tiny", "test")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    dtypes = []
    hook = model.get_layer("conv1").conv.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    default = saliency.explain(loaded, [tmp_path / "a.png"], "conv4", ["guided"])
    assert default.precision == "fp32" and set(dtypes) == {torch.float32}
    dtypes.clear()
    low = saliency.explain(loaded, [tmp_path / "a.png"], "conv4", ["guided"], precision="bf16")
    hook.remove()
    assert low.precision == "bf16" and set(dtypes) == {torch.bfloat16}
    assert low.maps["guided"].dtype == torch.float32
    assert not torch.equal(low.maps["guided"], default.maps["guided"])
    with pytest.raises(ValueError, match="unknown precision"):
        saliency.explain(loaded, [tmp_path / "a.png"], "conv4", ["guided"], precision="fp8")


def test_images_are_fitted_as_the_model_is_configured(tmp_path):
    from allconv_cli.data.images import fit_image, open_image

    pixels = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.squeezenet1_1(num_classes=1000)
    save_file(net.state_dict(), str(tmp_path / "squeeze.safetensors"))
    foreign = load_checkpoint(tmp_path / "squeeze.safetensors", "squeezenet1_1")
    assert (foreign.interpolation, foreign.crop_pct) == ("bilinear", 224 / 256)
    images, inputs = foreign.read_images([tmp_path / "photo.png"])
    expected = fit_image(open_image(tmp_path / "photo.png"), (3, 224, 224), "bilinear", 224 / 256)
    exact(images[0], expected.float() / 255)
    exact(inputs, foreign.preprocess(images))


def input_x_gradient(model, x, rows, layer):
    """Gradient times input (Shrikumar et al., 2016): a method the table does not have."""
    return maps.backprop(model, x, rows) * x


def test_a_method_is_one_table_entry(monkeypatch):
    """A new method is its entry (with its function) alone: computing, validation and defaults follow."""
    entry = Method("input × gradient", input_x_gradient)
    monkeypatch.setitem(SALIENCY_METHODS, "input-x-gradient", entry)
    model = create_model("all-cnn-c").eval()
    x = torch.rand(2, 3, 32, 32)
    for targets in (select_targets(model, x, None, target_class=3), select_targets(model, x, "conv6")):
        computed = saliency_maps(model, x, targets, "input-x-gradient")
        assert computed.shape == (2, 3, 32, 32)
        assert torch.allclose(computed, saliency_maps(model, x, targets, "backprop") * x)
    assert "input-x-gradient" in fitting(by_class=False) and "input-x-gradient" in fitting(by_class=True)
    monkeypatch.setitem(SALIENCY_METHODS, "flat", Method("flat", lambda model, x, rows, layer: x.flatten(1)))
    with pytest.raises(ValueError, match="method flat returned maps of shape \\(2, 3072\\)"):
        saliency_maps(model, x, targets, "flat")


def test_every_entry_names_a_function_that_exists():
    for name, entry in SALIENCY_METHODS.items():
        assert callable(entry.function()), name
        assert entry.function().__module__ == "allconv_cli.explain.maps" or callable(entry.compute), name
    assert set(PAPER_METHODS) == {"backprop", "deconvnet", "guided"}
    assert set(fitting(by_class=False)) == set(PAPER_METHODS) | {"input-x-gradient", "integrated-gradients",
                                                                 "smoothgrad", "occlusion"}
