"""The CUDA and DDP paths, checked on the CPU (issue 35): device queries monkeypatched, DDP on two
gloo processes. Each test names the defect it covers."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from allconv_cli import benchmark
from allconv_cli.data import splits
from allconv_cli.data.batches import Batches
from allconv_cli.device import resolve_device, resolve_precision
from allconv_cli.evaluate import evaluate
from allconv_cli.train import RunFolder, build, make_learner, train
from allconv_cli.train import run as trainer
from allconv_cli.train import settings as configuration
from allconv_cli.train.sync_batch_norm import SyncBatchNorm

REPO = Path(__file__).resolve().parents[1]


def tiny(**kwargs):
    """4 steps of 16 sample images, 2 epochs, BatchNorm, no dropout: about a second here."""
    settings = dict(batch_norm=True, train_limit=64, test_limit=33, batch_size=16, epochs=2, lr=0.05,
                    warmup_epochs=0.5, seed=3, precision="fp32", drop_input=0.0, drop_rate=0.0, workers=0)
    settings.update(kwargs)
    return configuration.resolve(None, **settings)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with CUDA and ``fake_cuda.count`` GPUs of ``fake_cuda.capability``, as torch reports them."""
    class Machine:
        count, capability, name = 2, (9, 0), "NVIDIA H200"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Machine.count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: Machine.capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: Machine.name)
    return Machine


# --- 1. fp16 in the peak table ------------------------------------------------------------------

@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 PCIe", 756.5)])
def test_1_fp16_has_a_peak_on_a100_h100_and_h200(fake_cuda, name, peak):
    fake_cuda.name = name
    assert benchmark.peak_tflops(torch.device("cuda"), "fp16") == peak
    assert benchmark.peak_tflops(torch.device("cuda"), "fp8") is None  # an arithmetic the table lacks: unknown


# --- 2. strong augmentation needs an even batch per process --------------------------------------

def test_2_strong_augmentation_with_an_odd_batch_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"needs an even batch per process: --batch-size 15 is odd; give "
                                         r"--batch-size 16 or 14"):
        train(tiny(augment="strong", batch_size=15), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_2_strong_augmentation_over_six_processes_names_the_per_process_batch():
    with pytest.raises(ValueError, match=r"--batch-size 128 over 6 processes gives 21 each; give --batch-size "
                                         r"132 or 120"):
        trainer.check_batch(tiny(augment="strong", batch_size=128), 6)
    trainer.check_batch(tiny(augment="strong", batch_size=132), 6)
    trainer.check_batch(tiny(augment="paper", batch_size=128), 6)


def test_2_strong_augmentation_trains_with_an_even_batch(tmp_path):
    assert train(tiny(augment="strong", epochs=1), tmp_path / "run")["finished"]


# --- 3. a GPU the machine does not have ----------------------------------------------------------

def test_3_a_device_index_beyond_the_gpus_is_refused(fake_cuda):
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2' asked for, but this machine has 2 GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_3_more_torchrun_processes_than_gpus_are_refused(fake_cuda):
    fake_cuda.count = 1
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="torchrun started process 1 of this machine, but it has 1 GPU: give "
                                         "torchrun --nproc-per-node 1 or fewer"):
        resolve_device("cuda", local_rank=1)
    assert resolve_device("cpu", local_rank=5) == torch.device("cpu")  # gloo on the CPU: any number


# --- 8. emulated bf16 -----------------------------------------------------------------------------

@pytest.mark.parametrize("capability, precision", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                                   ((9, 0), "bf16")], ids=["V100", "T4", "A100", "H100"])
def test_8_auto_takes_bf16_only_where_the_gpu_computes_it(fake_cuda, capability, precision):
    fake_cuda.capability = capability  # torch.cuda.is_bf16_supported() says True on all four
    assert resolve_precision("auto", torch.device("cuda")) == precision


# --- 9. the benchmark's arithmetic and memory -----------------------------------------------------

def test_9_the_matmul_runs_in_tf32_exactly_when_the_convolutions_do(monkeypatch):
    monkeypatch.setitem(benchmark.MATMUL_SIZE, "cpu", 64)
    seen = []
    monkeypatch.setattr(benchmark, "_sync", lambda device: seen.append(torch.backends.cuda.matmul.allow_tf32))
    before = torch.backends.cuda.matmul.allow_tf32
    for arithmetic in ("tf32", "fp32"):
        seen.clear()
        benchmark.matmul_tflops(torch.device("cpu"), arithmetic, seconds=0)
        assert seen and set(seen) == {arithmetic == "tf32"}
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_9_peak_memory_is_that_of_the_timed_steps(monkeypatch):
    events = []
    monkeypatch.setattr(benchmark, "_sync", lambda device: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**20)
    bench = benchmark._Bench(torch.device("cuda"), 8, steps=3, warmup=2, peak=None, matmul=1.0)
    result = bench._measure(lambda: events.append("step"), flops=10**9)
    assert events == ["step", "step", "reset", "step", "step", "step"]
    assert result["peak_cuda_mb"] == 1.0


# --- 7. the fp16 loss scale ------------------------------------------------------------------------

def test_7_the_loss_scale_is_saved_and_restored(tmp_path):
    config = tiny()
    device = torch.device("cpu")
    setups, learners = [], []
    for _ in range(2):
        setups.append(build(config, device))
        learners.append(make_learner(config, setups[-1].model, setups[-1].preprocess, 10, len(setups[-1].train)))
        learners[-1].scaler = torch.amp.GradScaler("cpu")  # what fp16 makes (on CUDA); its state is the same
    learners[0].scaler.scale(torch.ones(()))  # a step begins: the scale exists from here
    learners[0].scaler.update(new_scale=1024.0)  # as after overflows backed it off from 65,536
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.save(learners[0], trainer.Position(epoch=1, sums=torch.zeros(3, dtype=torch.float64)), setups[0], 1)
    state = torch.load(run.path / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 1024.0
    run.restore(learners[1], state, 0, 1)
    assert learners[1].scaler.get_scale() == 1024.0


# --- 6. evaluation shards cover every image ---------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 6, 7])
def test_6_evaluation_shards_cover_every_example_once(world):
    data = splits.ImageData(torch.zeros(10_000, 1, 1, 1, dtype=torch.uint8), torch.arange(10_000), ["x"])
    seen = torch.cat([labels for rank in range(world)
                      for _, labels in Batches(data, 256, shuffle=False, rank=rank, world=world).epoch(0)])
    assert len(seen) == 10_000 and seen.sort().values.equal(torch.arange(10_000))
    train_steps = {len(Batches(data, 256, shuffle=True, drop_last=True, rank=r, world=world))
                   for r in range(world)}
    assert len(train_steps) == 1  # training shards stay equal: every process takes the same steps


# --- DDP on two gloo processes: 4, 5 and 6 --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, ports: tuple[int, int], config_json: str, out: str):
    """One DDP process: the run's own setup (seeding, build, learner), its checks, then the run."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    config = configuration.from_json(config_json)
    torch.distributed.init_process_group("gloo")
    trainer._seed(config)
    setup = build(config, torch.device("cpu"), rank, world)
    learner = make_learner(config, setup.model, setup.preprocess, len(setup.classes), len(setup.train), rank, world)
    copies = torch.cat([t.flatten() for t in [*learner.ema.module.state_dict().values(),
                                              *learner.lookahead.state_dict().values()] if t.is_floating_point()])
    gathered = [torch.empty_like(copies) for _ in range(world)]
    torch.distributed.all_gather(gathered, copies)
    # (4, 5, 6): copies equal on every rank; BatchNorm over the global batch; every test image evaluated
    norm = next(m for m in learner.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    norm.train()
    x = torch.randn(2 * 8, norm.num_features, 4, 4, generator=torch.Generator().manual_seed(0))  # the global batch
    mine = x[8 * rank:8 * rank + 8]  # this rank's half
    before = norm.running_mean.clone()
    norm(mine)
    counted = evaluate(learner.model, setup.evaluate, setup.preprocess, len(setup.classes))["count"]
    checks = {"copies_equal": all(torch.equal(g, gathered[0]) for g in gathered),
              "sync_batch_norm": type(norm) is SyncBatchNorm,
              "running_mean": ((norm.running_mean - (1 - norm.momentum) * before) / norm.momentum).tolist(),
              "global_mean": x.mean((0, 2, 3)).tolist(),
              "evaluated": counted, "test_images": len(setup.evaluate.data)}
    torch.distributed.destroy_process_group()
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh store: the first one's port may linger
    summary = train(config, Path(out) / "run")  # the run itself, as torchrun starts it
    if rank == 0:
        (Path(out) / "checks.json").write_text(json.dumps({**checks, "summary": summary}))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """A two-process gloo run of tiny(ema_decay, lookahead_decay) with its checks, and the same run in
    one process at the same global batch (augmentation off: it is seeded per process)."""
    out = tmp_path_factory.mktemp("ddp")
    config = tiny(ema_decay=0.9, lookahead_decay=0.95, augment="none", train_limit=32, lr=0.01)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_gpu_paths as t; "
            "import torch.multiprocessing as mp; "
            f"mp.spawn(t._rank, args=(2, ({_free_port()}, {_free_port()}), {config.to_json()!r}, {str(out)!r}), "
            "nprocs=2)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = train(config, out / "single")
    return json.loads((out / "checks.json").read_text()), out / "run", single, out / "single"


def test_4_ema_and_lookahead_start_from_the_same_weights_on_every_rank(ddp):
    checks, *_ = ddp
    assert checks["copies_equal"]


def test_5_batch_norm_normalizes_over_the_global_batch(ddp):
    checks, *_ = ddp
    assert checks["sync_batch_norm"]
    assert checks["running_mean"] == pytest.approx(checks["global_mean"], abs=1e-5)
    assert checks["summary"]["batch_per_process"] == 8 and checks["summary"]["processes"] == 2


def test_6_ddp_evaluation_counts_every_test_image(ddp):
    checks, *_ = ddp
    assert checks["test_images"] == 33 and checks["evaluated"] == 33


def test_4_5_6_two_processes_train_what_one_process_trains(ddp):
    """Same global batches (rank r takes every other image of them), BatchNorm over both halves,
    EMA and lookahead from the same start: the loss and weights of one process, to float rounding
    (sums in another order): measured here 1e-6 in the first epoch's loss and 9e-4 in the second's,
    where BatchNorm over each half alone ends 2.7e-2 away."""
    checks, run, single, single_run = ddp
    a, b = load_file(str(run / "model.safetensors")), load_file(str(single_run / "model.safetensors"))
    assert a.keys() == b.keys()
    a, b = (torch.cat([w[k].flatten() for k in sorted(w) if "running" not in k and w[k].is_floating_point()])
            for w in (a, b))
    assert (a - b).norm() / b.norm() < 1e-4, ((a - b).norm() / b.norm()).item()
    assert checks["summary"]["last"]["train_loss"] == pytest.approx(single["last"]["train_loss"], rel=5e-3)
    assert checks["summary"]["last"]["test_top1_error"] == single["last"]["test_top1_error"]


# --- 10. the gpu marker -------------------------------------------------------------------------------

def test_10_every_gpu_test_is_marked_and_skips_cleanly_without_cuda():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", str(REPO / "tests" / "test_gpu.py")]
    unmarked = subprocess.run([*args, "--collect-only", "-m", "not gpu"], capture_output=True, text=True, env=env)
    assert "no tests collected" in unmarked.stdout and "deselected" in unmarked.stdout, unmarked.stdout
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " skipped" in run.stdout and "passed" not in run.stdout and "failed" not in run.stdout, run.stdout
    assert "needs CUDA" in run.stdout
