"""allconv benchmark and benchmarks/bench_train.py: output shape, FLOP counting and the peak
table, on tiny CPU runs (one timed step of two images). Nothing here asserts a speed."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from allconv_cli import benchmark
from allconv_cli.cli import app
from allconv_cli.device import resolve_precision
from allconv_cli.models import create_model

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = ["--steps", "1", "--warmup", "1", "--batch-size", "2", "--device", "cpu"]
RESULT_KEYS = {"images_per_s", "step_ms", "gflop_per_image", "tflop_per_s", "peak_share", "matmul_share",
               "peak_rss_mb", "peak_rss_since", "peak_cuda_mb", "others_cores"}
TRAIN_KEYS = RESULT_KEYS | {"ops_per_step", "ops_per_step_max", "view_ops_per_step"}  # ops: tests/test_step_ops.py
# All-CNN-C on 32x32, multiply-adds per conv: out C x H x W x (in C x kernel area).
ALL_CNN_C_MACS = [
    96 * 32 * 32 * 3 * 9,  # conv1, 3x3
    96 * 32 * 32 * 96 * 9,  # conv2, 3x3
    96 * 16 * 16 * 96 * 9,  # conv3, 3x3 stride 2
    192 * 16 * 16 * 96 * 9,  # conv4
    192 * 16 * 16 * 192 * 9,  # conv5
    192 * 8 * 8 * 192 * 9,  # conv6, stride 2
    192 * 6 * 6 * 192 * 9,  # conv7, unpadded 8x8 -> 6x6
    192 * 6 * 6 * 192,  # conv8, 1x1
    10 * 6 * 6 * 192,  # conv9, 1x1 to classes
]


@pytest.fixture(autouse=True)
def small_matmul(monkeypatch):
    """A 256 x 256 matmul for the rate: these tests check shapes, not speed."""
    monkeypatch.setitem(benchmark.MATMUL_SIZE, "cpu", 256)


def benchmark_json(*args):
    result = runner.invoke(app, ["benchmark", *TINY, *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_count_flops_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, groups=2))
    conv1 = 4 * 8 * 8 * 3 * 9  # (4, 8, 8) out, 3 x 3x3 in: 6,912 MACs
    conv2 = 8 * 3 * 3 * 2 * 9  # (8, 3, 3) out, 2 (= 4 / groups) x 3x3 in: 1,296 MACs
    # backward: conv1 needs its weight gradient only (the input needs none), conv2 both
    assert benchmark.count_flops(net, (3, 8, 8)) == {
        "forward": 2 * (conv1 + conv2), "train": 2 * (2 * conv1 + 3 * conv2)}
    net[0].requires_grad_(False)  # frozen: no weight gradient, and conv2's input needs none either
    assert benchmark.count_flops(net, (3, 8, 8)) == {
        "forward": 2 * (conv1 + conv2), "train": 2 * (conv1 + 2 * conv2)}


def test_count_flops_all_cnn_c():
    flops = benchmark.count_flops(create_model("all-cnn-c"), (3, 32, 32))
    assert flops["forward"] == 2 * sum(ALL_CNN_C_MACS) == 541_596_672
    assert flops["train"] == 3 * flops["forward"] - 2 * ALL_CNN_C_MACS[0]  # no input gradient for conv1


def test_benchmark_all_modes_json():
    out = benchmark_json("--mode", "all")
    assert out["model"] == "all-cnn-c" and out["device"] == "cpu"
    assert out["precision"] == resolve_precision("auto", torch.device("cpu")) and out["matmul_tflops"] > 0
    assert out["batch_size"] == 2 and out["steps"] == 1 and out["input_size"] == [3, 32, 32]
    assert out["peak_tflops"] is None  # no peak is known for a CPU
    assert out["gflop_per_image"]["forward"] == pytest.approx(0.542, rel=0.01)
    assert 2.9 < out["gflop_per_image"]["train"] / out["gflop_per_image"]["forward"] < 3.0
    assert list(out["results"]) == ["data", "infer", "train"]
    for mode, row in out["results"].items():
        assert set(row) == (TRAIN_KEYS if mode == "train" else RESULT_KEYS), mode
        assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["peak_rss_mb"] > 0
        assert row["peak_share"] is None and row["peak_cuda_mb"] is None
        assert (row["matmul_share"] is None) == (mode == "data")
    assert out["results"]["infer"]["gflop_per_image"] == pytest.approx(0.542, rel=0.01)
    assert out["results"]["train"]["gflop_per_image"] == out["gflop_per_image"]["train"]
    assert out["results"]["data"]["gflop_per_image"] is None and out["results"]["data"]["tflop_per_s"] is None


@pytest.mark.parametrize("mode", ["train", "infer", "data"])
def test_benchmark_one_mode(mode):
    out = benchmark_json("--mode", mode, "--no-channels-last")
    assert list(out["results"]) == [mode] and not out["channels_last"]
    row = out["results"][mode]
    assert set(row) == (TRAIN_KEYS if mode == "train" else RESULT_KEYS)
    assert (row["tflop_per_s"] is None) == (mode == "data")


def test_benchmark_table(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # rich wraps cells to the terminal; CI's has 80 columns
    result = runner.invoke(app, ["benchmark", *TINY, "--mode", "infer"])
    assert result.exit_code == 0, result.output
    assert "0.5416" in result.output and "unknown" in result.output and "MiB RSS" in result.output


@pytest.mark.parametrize("args, needle", [
    (["--mode", "fast"], "unknown mode 'fast'"),
    (["--model", "all-cnn-x"], "did you mean 'all-cnn-c'"),
    (["--device", "cuda"], "CUDA is not available here: give --device auto or one this machine has: cpu"),
    (["--steps", "0"], "--steps must be from 1 to 100,000"),
])
def test_benchmark_bad_input_is_one_line(args, needle):
    result = runner.invoke(app, ["benchmark", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines() == [result.output.strip()] and needle in result.output


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "fp32", 60.0),
    ("NVIDIA H200", "tf32", 494.7),
    ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("NVIDIA GH200 480GB", "bf16", None),  # not in the table: unknown, never a neighbour's
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_table(monkeypatch, name, precision, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert benchmark.peak_tflops(torch.device("cuda"), precision) == peak
    assert benchmark.peak_tflops(torch.device("cpu"), precision) is None


# --- benchmarks/bench_train.py ----------------------------------------------------------------

def load_script():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_section_is_refreshed(tmp_path):
    script = load_script()
    path = tmp_path / "RESULTS.md"

    def section(date, command, value):
        return f"## {date}: AMD EPYC (cpu)\n\n- command: `{command}`\n\n| a |\n|---|\n| {value} |\n"

    script.write_section(path, section("2026-01-01", "python b.py", 1))
    script.write_section(path, section("2026-01-02", "python b.py", 2))
    script.write_section(path, section("2026-01-01", "python b.py --steps 9", 3))
    script.write_section(path, section("2026-01-01", "python b.py", 4))  # a re-run: replaces the first
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert [line for line in text.splitlines() if line.startswith("| ") and line != "| a |"] == \
        ["| 2 |", "| 3 |", "| 4 |"]


def test_targets():
    script = load_script()
    assert script.target("cpu", "train", 50.0, 1.7) == (">= 1.65x baseline", "yes")
    assert script.target("cpu", "matmul", 74.0, 1.0) == (">= 75 % of matmul", "no")
    assert script.target("cpu-bf16", "train", 500.0, 4.4) == (">= 4.5x baseline", "no")
    assert script.target("cpu-bf16", "infer", 900.0, 3.1) == (">= 3.0x baseline", "yes")
    assert script.target("cpu", "rss", 1500.0, 1.0) == ("< 2,048 MiB", "yes")
    assert script.target("cuda", "data", 2e6, 1.0) == (">= 1,000,000 images/s", "yes")
    assert script.target("cpu", "data", 2e6, 1.0) == ("", "")


@pytest.mark.slow
def test_bench_train_script_tiny(tmp_path):
    out = tmp_path / "RESULTS.md"
    args = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--infer-batch-size", "8",
            "--out", str(out)]
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    for row in ("training images/s, data + step, batch 8", "data path images/s, batch 8",
                "inference images/s, batch 8", "peak RSS during training, MiB"):
        line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and float(cells[2].replace(",", "")) > 0, line
    assert "torch " in text and "allconv " in text and "--infer-batch-size 8" in text


def test_bench_train_bad_model_is_one_line():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--model", "all-cnn-x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "did you mean" in done.stderr


def test_peak_rss_restarts_per_measurement():
    import mmap

    from allconv_cli.benchmark import peak_rss_mb, reset_peak_rss

    # 200 MiB mapped straight from the kernel (malloc may keep freed memory: see tune_cpu_allocator)
    block = mmap.mmap(-1, 200 * 2**20)
    chunk = b"\1" * 2**20
    for start in range(0, len(block), len(chunk)):
        block[start:start + len(chunk)] = chunk
    before = peak_rss_mb()
    block.close()
    if not reset_peak_rss():
        pytest.skip("this system cannot restart the peak resident set size")
    assert peak_rss_mb() < before - 100
