import pytest
import torch
from safetensors.torch import save_file

from allconv_cli.data.preprocess import fit_zca
from allconv_cli.files.weights import (
    average_weights,
    load_model,
    load_state,
    load_weights,
    save_weights,
)
from allconv_cli.models import create_model
from allconv_cli.util import atomic_write_text

STANDARDIZE = {"kind": "standardize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def full_meta(model: str = "all_cnn_c", classes: int = 10, **kwargs) -> dict:
    """The metadata allconv train writes, for ``classes`` classes of 32x32 RGB images."""
    return {"model": model, "model_kwargs": {"num_classes": classes, **kwargs},
            "classes": [f"c{i}" for i in range(classes)], "input_size": [3, 32, 32], "preprocess": STANDARDIZE}


def test_round_trip_with_meta_and_preprocess(tmp_path):
    model = create_model("all-cnn-c", num_classes=4, in_chans=1, batch_norm=True).eval()
    zca_meta, zca_tensors = fit_zca(torch.rand(16, 1, 16, 16)).to_meta()
    meta = {**full_meta(classes=4, in_chans=1, batch_norm=True), "input_size": [1, 16, 16], "preprocess": zca_meta}
    path = save_weights(tmp_path / "model.safetensors", model, meta, preprocess=zca_tensors)
    loaded, meta2, pre = load_model(tmp_path)  # a run folder resolves to model.safetensors
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert meta2["classes"] == meta["classes"] and meta2["versions"]["torch"] == torch.__version__
    assert torch.equal(pre["zca_matrix"], zca_tensors["zca_matrix"]) and pre["zca_matrix"].shape == (256, 256)
    assert not list(tmp_path.glob("*.tmp"))
    assert path.name == "model.safetensors"


def test_fp16_file_loads_into_fp32_model(tmp_path):
    model = create_model("model-a").eval()
    save_weights(tmp_path / "w.safetensors", model, full_meta("model_a"), dtype=torch.float16)
    loaded, _, _ = load_model(tmp_path / "w.safetensors")
    assert loaded.get_layer("conv1").conv.weight.dtype == torch.float32
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=1e-2)


def test_average_is_the_mean_of_weights_and_batchnorm_statistics(tmp_path):
    meta = full_meta(classes=4, batch_norm=True)
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = create_model("all-cnn-c", num_classes=4, batch_norm=True).train()
        model(torch.randn(4, 3, 32, 32) + seed)  # distinct BatchNorm running statistics
        paths.append(save_weights(tmp_path / f"w{seed}.safetensors", model, meta))
    states = [load_weights(path)[0] for path in paths]
    mean = average_weights(paths)
    for suffix in ("bn.running_mean", "conv.weight"):
        name = next(k for k in mean if k.endswith(suffix))
        assert torch.allclose(mean[name], sum(state[name] for state in states) / 3, atol=1e-6)
        assert not torch.allclose(mean[name], states[0][name])
    counter = next(k for k in mean if k.endswith("num_batches_tracked"))
    assert mean[counter].dtype == torch.int64 and mean[counter] == states[0][counter]
    other = save_weights(tmp_path / "other.safetensors", create_model("all-cnn-c", num_classes=4),
                         full_meta(classes=4))
    with pytest.raises(ValueError, match="other.safetensors is not the model of"):
        average_weights([paths[0], other])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_garbage_and_truncated_files_are_value_errors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_model(path)


def test_truncated_real_checkpoint(tmp_path):
    path = save_weights(tmp_path / "m.safetensors", create_model("model-a"), full_meta("model_a"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(path)


def test_foreign_safetensors_and_other_model(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="without allconv metadata"):
        load_model(tmp_path / "foreign.safetensors")
    path = save_weights(tmp_path / "c.safetensors", create_model("model-c"), full_meta())
    with pytest.raises(ValueError, match="does not fit all-cnn-c"):
        load_model(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "nowhere")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = atomic_write_text(tmp_path / "config.json", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    from allconv_cli.util import atomic_write

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("change, needle", [
    (lambda w: w.fill_(float("nan")), "NaN or infinite"),
    (lambda w: w.to(torch.int64), "holds int64 values where the model has float32 ones"),
])
def test_plain_state_dicts_with_bad_values_are_refused(change, needle):
    model = create_model("model-a")
    state = model.state_dict()
    key = "features.conv1.conv.weight"
    state[key] = change(state[key].clone())
    with pytest.raises(ValueError, match=f"plain.safetensors does not fit model_a: {key} .*{needle}"):
        load_state(model, state, "plain.safetensors does not fit model_a")


def test_header_check_reads_no_tensor(tmp_path, monkeypatch):
    import allconv_cli.files.weights as checkpoint

    path = save_weights(tmp_path / "m.safetensors", create_model("model-a"), full_meta("model_a"))
    monkeypatch.setattr(checkpoint, "load_file", lambda *a, **k: pytest.fail("tensors were read"))
    assert checkpoint.check_weights_file(path)["model"] == "model_a"
