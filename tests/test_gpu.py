"""The CUDA paths on a GPU: every test is marked `gpu`, runs allconv's commands in subprocesses
that see the GPUs (conftest hides them from this process only), and is skipped without CUDA."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.gpu

SMOKE = ["--preset", "smoke", "--train-limit", "512", "--test-limit", "256", "--epochs", "2", "--device", "cuda"]


def allconv(env: dict, *args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "allconv_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_resumes_bit_exactly_on_cuda(tmp_path, gpu_env, precision):
    """Two epochs straight, and one epoch then a resume in a new process: the same weights, with
    deterministic kernels (cuDNN's autotuner may pick other algorithms in another process)."""
    settings = [*SMOKE, "--precision", precision, "--deterministic"]
    straight = json.loads(allconv(gpu_env, "train", *settings, "--out", tmp_path / "straight", "--json").stdout)
    assert straight["finished"] and straight["precision"] == precision
    allconv(gpu_env, "train", *settings, "--out", tmp_path / "split", "--stop-after", "1")
    state = torch.load(tmp_path / "split" / "state.pt", map_location="cpu", weights_only=True)  # this process sees no GPU
    assert state["epoch"] == 1 and (state["scaler"] is not None) == (precision == "fp16")
    allconv(gpu_env, "train", "--resume", tmp_path / "split")
    assert same_weights(tmp_path / "straight", tmp_path / "split")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_benchmark_json_on_cuda(gpu_env, precision):
    out = json.loads(allconv(gpu_env, "benchmark", "--device", "cuda", "--mode", "train", "--precision", precision,
                             "--steps", "20", "--warmup", "5", "--json").stdout)
    train = out["results"]["train"]
    assert out["device"] == "cuda" and out["kernels"].startswith("cuDNN")
    assert out["precision"] == ("tf32" if precision == "fp32" else precision)  # cuDNN's default for fp32
    assert train["images_per_s"] > 0 and train["peak_cuda_mb"] > 0
    assert 0 < train["matmul_share"] < 1  # the network below a matmul in the same arithmetic
    if any(name in out["device_name"] for name in ("A100", "H100", "H200")):
        assert out["peak_tflops"] is not None and 0 < train["peak_share"] < 1


def test_compile_on_cuda(tmp_path, gpu_env):
    out = json.loads(allconv(gpu_env, "benchmark", "--device", "cuda", "--mode", "train", "--compile", "--steps", "20",
                             "--warmup", "10", "--json").stdout)
    assert out["compile"] and out["results"]["train"]["images_per_s"] > 0
    summary = json.loads(allconv(gpu_env, "train", *SMOKE, "--compile", "--out", tmp_path / "run", "--json").stdout)
    assert summary["finished"]


def test_export_and_visualize_a_cuda_trained_run(tmp_path, gpu_env):
    run = tmp_path / "run"
    allconv(gpu_env, "train", *SMOKE, "--out", run)
    for fmt in ("safetensors", "pt2"):  # neither needs onnx
        allconv(gpu_env, "export", run, "--format", fmt, "--json")
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32), (200, 30, 40)).save(image)
    allconv(gpu_env, "visualize", image, "--checkpoint", run, "--device", "cuda", "--out", tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_two_gpu_ddp_stops_and_resumes_to_the_same_weights(tmp_path, gpu_env, cuda_count):
    if cuda_count < 2:
        pytest.skip(f"needs two GPUs; this machine has {cuda_count}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "allconv_cli", "train",
                *SMOKE, "--deterministic"]
    for args in ([*torchrun, "--out", str(tmp_path / "straight")], [*torchrun, "--out", str(tmp_path / "split"),
                                                                     "--stop-after", "1"],
                 [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "allconv_cli", "train",
                  "--resume", str(tmp_path / "split")]):
        done = subprocess.run(args, capture_output=True, text=True, env=gpu_env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(tmp_path / "split" / "state.pt", map_location="cpu", weights_only=True)["world"] == 2
    assert same_weights(tmp_path / "straight", tmp_path / "split")


CAPTURED_VS_EAGER = """
import json, torch
from allconv_cli.data.preprocess import Standardize
from allconv_cli.models import create_model
from allconv_cli.train.learner import make_learner
from allconv_cli.train.settings import model_kwargs, resolve
from allconv_cli.train.step import train_step
losses = {}
for compile in (False, True):
    config = resolve("fast-cifar10", compile=compile, precision="fp32", device="cuda")
    torch.manual_seed(0)
    net = create_model(config.model, **model_kwargs(config, 10)).cuda().to(memory_format=torch.channels_last)
    prep = Standardize(net.pretrained_cfg["mean"], net.pretrained_cfg["std"]).cuda()
    learner = make_learner(config, net, prep, 10, steps_per_epoch=10)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    generator = torch.Generator(device="cuda")
    losses[str(compile)] = [float(train_step(learner, images.cuda(), labels.cuda(), 0, i, generator)[0])
                            for i in range(6)]
print(json.dumps(losses))
"""


def test_the_captured_step_gives_the_eager_loss_on_cuda(gpu_env):
    """--compile on one GPU replays the forward and backward as CUDA graphs (mode reduce-overhead):
    six steps of the fast recipe in fp32 (TF32 convolutions) give the eager losses to 1e-3."""
    done = subprocess.run([sys.executable, "-c", CAPTURED_VS_EAGER], capture_output=True, text=True, env=gpu_env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads(done.stdout.strip().splitlines()[-1])
    assert losses["True"] == pytest.approx(losses["False"], rel=1e-3), losses
