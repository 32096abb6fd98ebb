"""--precision: the auto choice from the device's capabilities (mocked), and both paths on any CPU."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from allconv_cli import benchmark
from allconv_cli import device as devices
from allconv_cli import train as trainer
from allconv_cli.cli import app
from allconv_cli.train import settings as configuration

runner = CliRunner()
CPU = torch.device("cpu")


@pytest.mark.parametrize("kernels, expected", [
    ({"amx": True, "avx512_bf16": True}, "bf16"),  # Sapphire Rapids and later Xeons
    ({"amx": False, "avx512_bf16": True}, "bf16"),  # Cooper Lake, AMD Zen 4
    ({"amx": False, "avx512_bf16": False}, "fp32"),  # AVX2-only or AVX-512 without BF16: bf16 is emulated
])
def test_auto_follows_the_cpu(monkeypatch, kernels, expected):
    monkeypatch.setattr(devices, "cpu_bf16_kernels", lambda: kernels)
    assert devices.resolve_precision("auto", CPU) == expected
    assert devices.resolve_precision(None, CPU) == expected
    assert devices.resolve_precision("fp32", CPU) == "fp32" and devices.resolve_precision("bf16", CPU) == "bf16"


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_follows_the_gpu(monkeypatch, capability, expected):
    """bf16 where the GPU computes it natively (Ampere and later), else fp32."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: capability)
    assert devices.resolve_precision("auto", torch.device("cuda")) == expected
    assert devices.resolve_precision("fp16", torch.device("cuda")) == "fp16"


def test_cpu_flags_decide_the_kernels(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert devices.cpu_bf16_kernels() == {"amx": False, "avx512_bf16": True}
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert devices.cpu_bf16_kernels() == {"amx": True, "avx512_bf16": False}
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "fma"})
    assert not any(devices.cpu_bf16_kernels().values())


def test_bad_precisions_are_one_line():
    with pytest.raises(ValueError, match="fp16 autocast runs on CUDA only"):
        devices.resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        devices.resolve_precision("fp8", CPU)
    result = runner.invoke(app, ["train", "--preset", "smoke", "--precision", "fp16", "--device", "cpu"])
    assert result.exit_code == 2 and "fp16 autocast runs on CUDA only" in result.output
    assert "Traceback" not in result.output


def _conv_dtypes(model):
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_paths_train_on_any_cpu_and_are_recorded(tmp_path, precision):
    config = configuration.resolve(None, train_limit=64, test_limit=32, batch_size=32, epochs=1,
                                   precision=precision)
    setup = trainer.build(config, CPU)
    learner = trainer.make_learner(config, setup.model, setup.preprocess, 10, len(setup.train))
    dtypes = _conv_dtypes(setup.model)
    position = trainer.fit(learner, setup.train, trainer.Position(), 1)
    assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    # weights, optimizer state and BatchNorm statistics stay fp32 under autocast
    assert all(v.dtype in (torch.float32, torch.int64) for v in setup.model.state_dict().values())
    states = [t for state in learner.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    assert states and all(t.dtype == torch.float32 for t in states if t.is_floating_point())
    assert position.history[0]["precision"] == precision

    summary = trainer.train(config, tmp_path / "run")
    assert summary["precision"] == precision
    from allconv_cli.files import weights as checkpoint

    meta = checkpoint.load_weights(tmp_path / "run")[1]
    assert meta["precision"] == precision
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == precision
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["precision"] == precision


def test_auto_is_resolved_once_and_recorded(tmp_path):
    result = runner.invoke(app, ["train", "--preset", "smoke", "--train-limit", "64", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    chosen = devices.resolve_precision("auto", CPU)
    assert re.search(rf"cpu, \d+ CPU threads? \([^)]*\), {chosen} ->", result.output)  # printed at the start of the run
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == chosen


def test_benchmark_times_the_trainers_own_step(monkeypatch):
    calls = []
    real = trainer.train_step
    monkeypatch.setattr("allconv_cli.benchmark.train_step", lambda *args: calls.append(args[3:5]) or real(*args))
    monkeypatch.setitem(benchmark.MATMUL_SIZE, "cpu", 256)
    config = configuration.resolve(None, batch_size=4, device="cpu", precision="bf16")
    result = benchmark.run(config, mode="train", steps=2, warmup=1)
    # warm-up, timed steps, then five steps whose dispatched ops are counted
    assert calls == [(0, i) for i in range(8)] and result["precision"] == "bf16"
    assert result["results"]["train"]["matmul_share"] > 0
