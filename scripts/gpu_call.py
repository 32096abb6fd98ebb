"""One device call that spends a GPU well (issue 35): the GPU tests, the benchmark, then the
paper's experiments sized from the speeds just measured, in order of value, each step under a
time guard that stops training resumably; every result lands in OUT the moment it exists.

From the repository root, on a machine with nothing installed beyond a stock PyTorch image:

    PYTHONPATH=$PWD python3 scripts/gpu_call.py --out $OUT [--budget 540] [--carry DIR]

OUT receives at most eight flat files (the device returns 8 files of at most 16 MiB):
``results.jsonl`` (one JSON object per step, appended as each ends: command, exit code, wall
seconds, whether the guard stopped it, its --json output; plus the environment and the plan),
``log.txt`` (this script's lines and every command's stderr), ``runs-small.tar.gz`` (the runs'
config, metrics, results, tables and charts, rewritten after every step), ``weights.tar`` (fp16
weights of finished runs, all-cnn-c first, at most 16 MiB) and ``carry-NN.tar`` (what a second
call needs to continue the unfinished runs: their settings, states and the finished runs' small
files; at most 4 parts of 16 MiB, 60 MiB in all). A second call continues from them:
copy the carry-NN.tar files into a folder of the repository (e.g. ``.carry/``, carried to the
device) and give ``--carry .carry``.

``--rehearsal`` runs the same steps on the CPU with the bundled sample and tiny sizes, so the
call is tested on every commit (tests/test_gpu_call.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PART_BYTES = 16 * 2**20  # the device returns files of at most 16 MiB
CARRY_BYTES = 60 * 2**20  # what may travel into the next call: 64 MiB in all, with room for the code
CARRY_PARTS = 4  # 8 returned files: results, log, small files, weights and 4 parts
# (grace after SIGTERM for the checkpoints, reserve at the end for packing), seconds: on the GPU a
# checkpoint of a paper run writes 54 MB (weights with the 36 MiB ZCA matrix, then weights and momentum)
STOP_S = {False: (45, 30), True: (10, 4)}  # by --rehearsal: (grace, reserve)
# what an unfinished run resumes from beyond its small files: the state and the preprocessing
# (written once a run; the ZCA matrix, 36 MiB)
STATE = ("state.pt", "preprocess.safetensors")
SMALL = ("config.json", "metrics.jsonl", "result.json", "ablation.json", "table.md", "table.csv", "table.json",
         "curves.png", "chart.png")
# --rehearsal: the sizes that keep each step to seconds on two CPU cores (the paper protocol's
# 100 epochs never end: the guard stops it after its first checkpoint, as a GPU call's budget does)
REHEARSAL = {"fast-recipe": ["--train-limit", 64, "--test-limit", 32, "--batch-size", 32],
             "fast-protocol": ["--train-limit", 64, "--test-limit", 32, "--batch-size", 32, "--epochs", 1],
             "paper-protocol": ["--train-limit", 128, "--test-limit", 32, "--batch-size", 32, "--epochs", 100]}
TWELVE = ",".join(f"{kind}-{family}" for family in "abc"
                  for kind in ("model", "strided-cnn", "convpool-cnn", "all-cnn"))


class Call:
    """One call: its clock, output folder, work folder and what earlier calls finished."""

    def __init__(self, args):
        self.start, self.budget, self.rehearsal = time.monotonic(), args.budget, args.rehearsal
        self.grace, self.reserve = STOP_S[args.rehearsal]
        self.out, self.work = Path(args.out).resolve(), Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs = self.work / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.txt"
        self.done: list[str] = []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def log(self, line: str):
        with open(self.log_path, "a") as f:
            f.write(f"[{time.monotonic() - self.start:5.0f} s] {line}\n")

    def record(self, entry: dict):
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def run_step(call: Call, name: str, argv: list[str], limit: float, checkpoints: Path | None = None) -> dict:
    """Run ``argv`` in its own session under a guard: at ``limit`` s (or when the budget nears
    its reserve) SIGTERM to the whole group (the trainer writes a resumable checkpoint), SIGKILL
    after the grace. In a rehearsal, a step given ``checkpoints`` (a folder of runs) is stopped
    as soon as one of its runs has written a checkpoint in this call, so that the stop always
    finds a run training, however slow the machine. Records and returns the step's entry; its
    --json stdout is parsed."""
    if name in call.done:
        call.log(f"skip {name}: done in an earlier call")
        return {"step": name, "skipped": "done in an earlier call"}
    limit = min(limit, call.left() - call.reserve - call.grace)
    if limit < 5:
        entry = {"step": name, "skipped": f"no time left ({call.left():.0f} s of the budget)"}
        call.record(entry)
        return entry
    call.log(f"start {name} (limit {limit:.0f} s): {' '.join(argv)}")
    started = time.monotonic()
    with open(call.log_path, "a") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=call.env, cwd=call.work, start_new_session=True)
        ready = None
        if call.rehearsal and checkpoints is not None:
            clock = time.time()

            def ready():
                return any(p.stat().st_mtime > clock for p in checkpoints.rglob("state.pt"))

        stopped = _guard(proc, limit, call.grace, ready)
        out.seek(0)
        text = out.read()
    entry = {"step": name, "rc": proc.returncode, "wall_s": round(time.monotonic() - started, 1), "stopped": stopped,
             "cmd": " ".join(argv), "out": _json_or_text(text)}
    call.log(f"end {name}: rc {proc.returncode} in {entry['wall_s']} s{' (stopped by the guard)' if stopped else ''}")
    call.record(entry)
    if proc.returncode == 0:
        call.done.append(name)
    write_small_files(call)
    return entry


def _guard(proc: subprocess.Popen, limit: float, grace: float, ready=None) -> bool:
    """Wait ``limit`` s (or until ``ready()``); then stop the process group resumably. True if it
    had to be stopped."""
    end = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < end and not (ready and ready()):
        time.sleep(0.5)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return True


def _json_or_text(text: str):
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    try:
        return json.loads(text[start:]) if start >= 0 else text[-2000:]
    except ValueError:
        return text[-2000:]


def allconv(*args) -> list[str]:
    return [sys.executable, "-m", "allconv_cli", *map(str, args)]


def environment(call: Call) -> dict:
    """Versions, the GPU, and which packages the steps need are importable (onnx is not needed)."""
    found = {name: importlib.util.find_spec(name) is not None
             for name in ("torch", "torchvision", "timm", "typer", "rich", "numpy", "PIL", "safetensors",
                          "matplotlib", "pytest", "onnx")}
    versions = {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "timm")
                if importlib.util.find_spec(name)}
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    entry = {"step": "environment", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "packages": found,
             "versions": versions, "gpus": gpus.stdout.strip().splitlines() if gpus else [], "cpus": os.cpu_count(),
             "budget_s": call.budget, "rehearsal": call.rehearsal}
    if not found["matplotlib"]:  # allconv_cli.charts imports it at module level, through train/run_folder.py
        entry["missing"] = "matplotlib: allconv train, ablate and benchmark import it; only the GPU tests can run"
    call.record(entry)
    return entry


def data_args(call: Call, archive: Path | None) -> list[str]:
    """--dataset and --data-dir of the runs: the CIFAR-10 JPEG archive unpacked (once per call),
    or the bundled sample in a rehearsal."""
    if call.rehearsal:
        return ["--dataset", "sample"]
    archive = archive or next((p for p in (REPO / "shared/data/cifar10-jpeg.tar.gz",
                                           REPO.parent / "shared/data/cifar10-jpeg.tar.gz",
                                           REPO / ".data/cifar10-jpeg.tar.gz") if p.is_file()), None)
    if archive is None:
        raise SystemExit("no CIFAR-10 archive: give --data PATH/cifar10-jpeg.tar.gz (see ../shared/data)")
    root = call.work / "cifar10"
    if not (root / "train").is_dir():
        started = time.monotonic()
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        call.log(f"CIFAR-10 unpacked from {archive} in {time.monotonic() - started:.0f} s")
    return ["--dataset", "imagefolder", "--data-dir", str(root)]


def gpu_tests(call: Call):
    if importlib.util.find_spec("pytest") is None:
        call.record({"step": "gpu-tests", "skipped": "pytest is not installed: carry its wheels (see the README)"})
        return
    run_step(call, "gpu-tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu",
                                 str(REPO / "tests" / "test_gpu.py")], 60 if call.rehearsal else 240)


def benchmarks(call: Call, data: list[str]) -> dict:
    """The trainer's step in bf16 at a few batch sizes, with and without --compile, fp16, four at
    once (how runs in parallel share the GPU), and the fast recipe's real epoch. -> speeds (img/s)."""
    device = ["--device", "cpu", "--steps", "2", "--warmup", "1"] if call.rehearsal else ["--device", "cuda"]
    precision = "auto" if call.rehearsal else "bf16"
    sizes = [32] if call.rehearsal else [128, 512, 1024]
    speeds = {}
    for size in sizes:
        for compiled in ([False] if call.rehearsal else [False, True]):
            name = f"bench-b{size}{'-compile' if compiled else ''}"
            entry = run_step(call, name, allconv("benchmark", "--mode", "train", "--json", "--precision", precision,
                                                 "--batch-size", size, *device, *(["--compile"] if compiled else [])),
                             120 if compiled else 60)
            speeds[name] = _speed(entry)
    if not call.rehearsal:
        speeds["bench-b128-fp16"] = _speed(run_step(call, "bench-b128-fp16", allconv(
            "benchmark", "--mode", "train", "--json", "--precision", "fp16", *device), 60))
        speeds["four-at-once"] = four_at_once(call, device)
    fast = run_step(call, "bench-fast-recipe", allconv(
        "train", "--preset", "fast-cifar10", *data, "--epochs", "1", *REHEARSAL["fast-recipe"] if call.rehearsal else
        ["--train-limit", 10_000, "--test-limit", 1_000], "--out", call.runs / "bench-fast", "--force", "--json"), 120)
    speeds["fast-recipe"] = ((fast.get("out") or {}).get("last") or {}).get("images_per_s") \
        if isinstance(fast.get("out"), dict) else None
    return speeds


def _speed(entry: dict) -> float | None:
    out = entry.get("out")
    return out["results"]["train"]["images_per_s"] if isinstance(out, dict) and "results" in out else None


def four_at_once(call: Call, device: list[str]) -> float | None:
    """Four default benchmarks at once on the GPU: their summed img/s, what --jobs 4 gains."""
    started = time.monotonic()
    procs = [subprocess.Popen(allconv("benchmark", "--mode", "train", "--json", "--precision", "bf16", *device),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=call.env)
             for _ in range(4)]
    outs = [_json_or_text(p.communicate(timeout=max(10.0, call.left() - call.reserve))[0]) for p in procs]
    speeds = [_speed({"out": out}) for out in outs]
    total = sum(speeds) if all(speeds) else None
    call.record({"step": "bench-four-at-once", "wall_s": round(time.monotonic() - started, 1), "images_per_s": speeds,
                 "total": total})
    return total


def plan(call: Call, speeds: dict, overhead: float) -> dict:
    """How much of each experiment fits in what is left, from the speeds just measured: the fast
    protocol (12 networks, 10 epochs) by whole seeds, 12 runs at once at the four-at-once rate,
    each run paying the fast recipe's measured start-up and evaluation time; then the paper
    protocol (350 epochs) for the C family at the single-process rate, as many at once as can
    travel to the next call (its state: weights, momentum and the 36 MiB ZCA matrix)."""
    left = call.left() - call.reserve - call.grace
    single = speeds.get("bench-b32" if call.rehearsal else "bench-b128")
    gain = speeds["four-at-once"] / single if speeds.get("four-at-once") and single else 1.0
    fast = speeds.get("fast-recipe")
    images = 64 if call.rehearsal else 50_000
    fast_run_s = (1 if call.rehearsal else 10) * images / fast + overhead if fast else None
    fast_seed_s = 12 * fast_run_s / max(1.0, gain) if fast_run_s else None
    seeds = min(3, int(left // fast_seed_s)) if fast_seed_s else 0
    if call.rehearsal:
        seeds = 1  # the rehearsal checks the steps, not the sizing: one seed of two small networks
    paper_run_s = 350 * 50_000 / single if single else None
    state_mb = (4 * (3072 ** 2 + 3072) + 8 * 1_369_738) / 1e6  # ZCA matrix and mean, weights and momentum
    jobs = max(1, int(CARRY_BYTES / 1e6 // state_mb))
    return {"step": "plan", "left_s": round(left), "single_images_per_s": single, "four_at_once_gain": gain,
            "fast_recipe_images_per_s": fast, "fast_overhead_s": overhead, "fast_seed_s": fast_seed_s,
            "fast_seeds": seeds, "paper_run_s": paper_run_s, "paper_state_mb": state_mb, "paper_jobs": jobs,
            "why": f"{seeds} seed(s) of the fast protocol fit in {left:.0f} s at {fast_seed_s or 0:.0f} s a seed; "
                   f"the paper protocol takes the rest: a run needs about {paper_run_s or 0:.0f} s alone, more than a "
                   f"call, and {jobs} run(s) at once can carry on to the next (a state is {state_mb:.0f} MB, the carry "
                   f"{CARRY_BYTES / 2**20:.0f} MiB)"}


def experiments(call: Call, data: list[str], chosen: dict):
    """The fast protocol over the twelve networks (whole seeds, finished in this call), then the
    paper protocol for the C family, stopped resumably at the budget's end."""
    device = ["--device", "cpu"] if call.rehearsal else ["--device", "cuda"]
    preset = call.work / "fast-nowhiten.toml"  # the A and B nets' 5x5 first convs cannot take the whitening
    preset.write_text((REPO / "presets" / "fast-cifar10.toml").read_text().replace('whiten = "frozen"', 'whiten = "off"'))
    if chosen["fast_seeds"]:
        tiny = REHEARSAL["fast-protocol"] if call.rehearsal else []
        run_step(call, "fast-protocol", allconv(
            "ablate", "--models", "all-cnn-c,model-c" if call.rehearsal else TWELVE, "--preset", preset, *data,
            "--seeds", chosen["fast_seeds"], "--jobs", 2 if call.rehearsal else 12, *device, *tiny,
            "--out", call.runs / "fast-protocol", "--json"), call.left())
    tiny = REHEARSAL["paper-protocol"] if call.rehearsal else []
    models = "all-cnn-c" if call.rehearsal else "all-cnn-c,model-c,strided-cnn-c,convpool-cnn-c"
    paper = "paper-cifar10"
    if not call.rehearsal:  # on the GPU its step replays as CUDA graphs (1.9x, 2026-12-04); the path is
        paper = call.work / "paper-compiled.toml"  # the same in every call, as a continued ablation demands
        paper.write_text((REPO / "presets" / "paper-cifar10.toml").read_text() + "compile = true\n")
    run_step(call, "paper-protocol", allconv(
        "ablate", "--models", models, "--preset", paper, *data, "--jobs", chosen["paper_jobs"], *device,
        *tiny, "--out", call.runs / "paper-protocol", "--json"), call.left(), call.runs / "paper-protocol")


def small_files(runs: Path) -> list[Path]:
    return sorted(p for p in runs.rglob("*") if p.name in SMALL and p.is_file())


def state_files(run: Path) -> list[Path]:
    """The files of STATE that ``run`` holds (a state.pt written by an allconv before
    preprocess.safetensors existed holds the preprocessing itself)."""
    return [run / name for name in STATE if (run / name).is_file()]


def write_small_files(call: Call):
    """runs-small.tar.gz: every run's small files, rewritten whole (atomically) after each step."""
    tmp = call.out / ".runs-small.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in small_files(call.runs):
            tar.add(path, arcname=str(path.relative_to(call.work)))
    os.replace(tmp, call.out / "runs-small.tar.gz")


def run_progress(state_path: Path) -> tuple[bool, float]:
    """(finished, share of the epochs done) of the run whose state.pt this is."""
    import torch

    from allconv_cli.train.loop import finished

    state = torch.load(state_path, map_location="cpu", weights_only=True)
    epochs = json.loads(state["config"])["epochs"]
    return finished(json.loads(state["history"]), epochs), (state["epoch"] + state["step"] / 1e6) / epochs


def pack_carry(call: Call, speeds: dict, overhead: float):
    """carry-NN.tar: what the next call needs: the steps done, the speeds, every run's small files
    and the states of unfinished runs, the furthest first, while they fit in CARRY_BYTES."""
    for old in call.out.glob("carry-*.tar"):
        old.unlink()
    unfinished = []
    for state in call.runs.rglob("state.pt"):
        done, share = run_progress(state)
        if not done and not (state.parent / "result.json").exists():
            unfinished.append((share, state))
    unfinished.sort(key=lambda item: -item[0])
    total, carried, left_behind = sum(p.stat().st_size for p in small_files(call.runs)), [], []
    for share, state in unfinished:
        size = sum(p.stat().st_size for p in state_files(state.parent))
        fits = total + size <= CARRY_BYTES
        (carried if fits else left_behind).append({"run": str(state.parent.relative_to(call.work)),
                                                   "done": round(share, 4)})
        total += size if fits else 0
    manifest = {"done": call.done, "speeds": speeds, "overhead": overhead, "carried": carried,
                "left_behind": left_behind}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for path in [*small_files(call.runs), *(p for c in carried for p in state_files(call.work / c["run"]))]:
            tar.add(path, arcname=str(path.relative_to(call.work)))
    blob = buffer.getvalue()
    parts = [blob[i:i + PART_BYTES] for i in range(0, len(blob), PART_BYTES)][:CARRY_PARTS]
    for i, part in enumerate(parts):
        (call.out / f"carry-{i:02d}.tar").write_bytes(part)
    call.record({"step": "carry", "parts": len(parts), "bytes": len(blob), "carried": carried,
                 "left_behind": left_behind})


def unpack_carry(call: Call, folder: Path) -> dict:
    """Restore an earlier call's runs into the work folder -> its manifest."""
    parts = sorted(folder.glob("carry-*.tar"))
    if not parts:
        raise SystemExit(f"--carry {folder} holds no carry-NN.tar: give the folder the previous call's files are in")
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(call.work, filter="data")
    manifest = json.loads((call.work / "manifest.json").read_text())
    call.done = list(manifest["done"])
    call.log(f"continued from {folder}: {len(manifest['carried'])} unfinished run(s), steps done: {call.done}")
    return manifest


def pack_weights(call: Call):
    """weights.tar: fp16 weights of finished runs with a result, all-cnn-c first, then by test error,
    while under 16 MiB (a ZCA run's 36 MiB matrix never fits; the fast protocol's runs do)."""
    import torch

    from allconv_cli.files.weights import load_model, save_weights

    results = [(json.loads(p.read_text()), p.parent) for p in call.runs.rglob("result.json")
               if (p.parent / "model.safetensors").is_file()]  # trained in this call: carried runs came back before
    results.sort(key=lambda item: (item[0]["model"].replace("_", "-") != "all-cnn-c", item[0]["test_error"] or 100))
    buffer, total = io.BytesIO(), 0
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=buffer, mode="w") as tar:
        for result, run in results:
            model, meta, tensors = load_model(run)
            path = Path(tmp) / "model.safetensors"
            save_weights(path, model, meta, preprocess=tensors, dtype=torch.float16)
            if total + path.stat().st_size > PART_BYTES - 2**20:
                continue
            total += path.stat().st_size
            tar.add(path, arcname=f"{run.relative_to(call.runs)}/model-fp16.safetensors")
    (call.out / "weights.tar").write_bytes(buffer.getvalue())
    call.record({"step": "weights", "runs": len(results), "bytes": total})


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-call"), help="where the files go (default $OUT)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole call (default 540)")
    parser.add_argument("--carry", type=Path, help="the folder holding an earlier call's carry-NN.tar files")
    parser.add_argument("--data", type=Path, help="cifar10-jpeg.tar.gz (default: shared/data, ../shared/data, .data)")
    parser.add_argument("--work", default="runs/gpu-call", help="where the runs are trained")
    parser.add_argument("--rehearsal", action="store_true", help="the same steps on the CPU, bundled sample, tiny")
    args = parser.parse_args(argv)
    call = Call(args)
    manifest = unpack_carry(call, args.carry) if args.carry else {}
    env = environment(call)
    if "missing" in env:
        gpu_tests(call)
        return
    data = data_args(call, args.data)
    gpu_tests(call)
    speeds = manifest.get("speeds") or benchmarks(call, data)
    overhead = manifest.get("overhead") or _overhead(call)
    chosen = plan(call, speeds, overhead)
    call.record(chosen)
    call.log(chosen["why"])
    experiments(call, data, chosen)
    pack_weights(call)
    pack_carry(call, speeds, overhead)
    call.log("done")


def _overhead(call: Call) -> float:
    """Seconds of a fast run that are not training (data, whitening, evaluation): its wall time
    minus its training time, from the bench-fast-recipe step."""
    for line in (call.out / "results.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("step") == "bench-fast-recipe" and isinstance(entry.get("out"), dict):
            return max(0.0, entry["wall_s"] - entry["out"]["last"]["seconds"])
    return 0.0


if __name__ == "__main__":
    main()
