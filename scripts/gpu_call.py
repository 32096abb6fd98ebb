"""A GPU session of a few minutes, spent in order of value on the paper protocol:

1. ``pair``: All-CNN-C under ``paper-cifar10`` crossed with the two choices the paper leaves open
   where allconv's first recipe and the Caffe reproduction that reached the paper's error differ
   (batch 128 or 256, ``xavier-open`` or ``caffe-xavier``): four runs at once, compiled, to 350 epochs;
2. ``family-c``: Model-C, Strided-CNN-C and ConvPool-CNN-C under ``paper-cifar10``.

Each step is one ``allconv ablate`` under ``--time-limit``, so every run stops resumably before
the session's budget ends and continues in the next session: OUT receives ``results.jsonl`` (the
environment, then each step's command, exit code, seconds and ``--json`` output), ``log.txt``
(the commands' stderr) and ``carry-NN.tar``: every run folder but its weights file
(``RunFolder.carried_files``: a resume reads the settings, the state and the preprocessing's
digest, 11 MB for a paper run, and fits the ZCA again; of a finished run its result and metrics),
in parts of at most 16 MiB. Copy the parts into a folder of the repository and give ``--carry FOLDER`` to
continue.

    PYTHONPATH=$PWD python3 scripts/gpu_call.py --out OUT [--budget 540] [--carry DIR] [--data ARCHIVE]

``--rehearsal`` runs the same steps on the CPU with the bundled sample at tiny sizes
(tests/test_gpu_call.py), so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from allconv_cli.ablate import RESULT_NAME
from allconv_cli.train.run_folder import CONFIG_NAME, RunFolder

REPO = Path(__file__).resolve().parents[1]
PART_BYTES = 16 * 2**20  # what one returned file may hold
CARRY_PARTS = 4  # parts of at most 16 MiB: what may travel into the next session, with room for the code
PACK_SECONDS = 30  # kept at the budget's end for packing the carry
PAIR = ["--grid", "batch_size=128,256", "--grid", "weight_init=xavier-open,caffe-xavier"]
STEPS = {  # name -> the ablation's own arguments
    "pair": ["--models", "all-cnn-c", *PAIR],
    "family-c": ["--models", "model-c,strided-cnn-c,convpool-cnn-c"],
}
# --rehearsal: tiny sizes for two CPU cores (standardized inputs: the ZCA refit has tests of its own)
REHEARSAL = ["--dataset", "sample", "--train-limit", "512", "--test-limit", "32", "--epochs", "100",
             "--preprocess", "standardize", "--device", "cpu", "--jobs", "2"]


class Session:
    """The clock, the output folder and the work folder of one session."""

    def __init__(self, args):
        self.start, self.budget, self.rehearsal = time.monotonic(), args.budget, args.rehearsal
        self.out, self.work = Path(args.out).resolve(), Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start) - PACK_SECONDS

    def record(self, entry: dict):
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def environment(session: Session):
    versions = {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "timm")}
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True) if not session.rehearsal else None
    session.record({"step": "environment", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "versions": versions, "gpus": gpus.stdout.strip().splitlines() if gpus else [],
                    "cpus": os.cpu_count(), "budget_s": session.budget, "rehearsal": session.rehearsal})


def data_args(session: Session, archive: Path | None) -> list[str]:
    """The CIFAR-10 JPEG archive unpacked once a session (the bundled sample in a rehearsal)."""
    if session.rehearsal:
        return REHEARSAL
    archive = archive or next((p for p in (REPO / "shared/data/cifar10-jpeg.tar.gz",
                                           REPO.parent / "shared/data/cifar10-jpeg.tar.gz") if p.is_file()), None)
    if archive is None:
        raise SystemExit("no CIFAR-10 archive: give --data PATH/cifar10-jpeg.tar.gz")
    root = session.work / "cifar10"
    if not (root / "train").is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    # relative to the work folder, where the steps run: a continued ablation's settings must not
    # name a path of one machine
    return ["--dataset", "imagefolder", "--data-dir", "cifar10", "--compile"]


def run_step(session: Session, name: str, data: list[str]):
    """One ablation, stopped by its own --time-limit before the budget's end; recorded."""
    if session.left() < 20:
        session.record({"step": name, "skipped": f"{session.left():.0f} s left"})
        return
    argv = [sys.executable, "-m", "allconv_cli", "ablate", *STEPS[name], "--preset", "paper-cifar10", *data,
            "--time-limit", f"{session.left():.0f}s", "--out", name, "--json"]
    started = time.monotonic()
    with open(session.out / "log.txt", "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=session.env, cwd=session.work)
    try:
        out = json.loads(done.stdout[done.stdout.index("["):]) if "[" in done.stdout else done.stdout[-2000:]
    except ValueError:
        out = done.stdout[-2000:]
    session.record({"step": name, "rc": done.returncode, "wall_s": round(time.monotonic() - started, 1),
                    "cmd": " ".join(argv[1:]), "out": out})


def carried(step: Path) -> list[Path]:
    """What continues an ablation elsewhere: its plan and tables, each run's result, and what
    ``RunFolder`` says continues the run (all but its weights; a finished run's state neither)."""
    files = [p for p in step.glob("*") if p.is_file() and p.suffix in (".json", ".md", ".csv")]
    for config in sorted(step.rglob(CONFIG_NAME)):
        result = config.parent / RESULT_NAME
        files += RunFolder(config.parent).carried_files(finished=result.is_file())
        files += [result] if result.is_file() else []
    return files


def pack_carry(session: Session):
    """carry-NN.tar: what continues every step's ablation in the next session."""
    for old in session.out.glob("carry-*.tar"):
        old.unlink()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in STEPS:
            for path in carried(session.work / name):
                tar.add(path, arcname=str(path.relative_to(session.work)))
    blob = buffer.getvalue()
    if len(blob) > CARRY_PARTS * PART_BYTES:
        raise SystemExit(f"the carry is {len(blob) / 2**20:.0f} MiB, over {CARRY_PARTS} parts of 16 MiB")
    for i in range(0, len(blob), PART_BYTES):
        (session.out / f"carry-{i // PART_BYTES:02d}.tar").write_bytes(blob[i:i + PART_BYTES])
    session.record({"step": "carry", "bytes": len(blob), "parts": -(-len(blob) // PART_BYTES)})


def unpack_carry(session: Session, folder: Path):
    parts = sorted(folder.glob("carry-*.tar"))
    if not parts:
        raise SystemExit(f"--carry {folder} holds no carry-NN.tar: give the folder the last session's files are in")
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(session.work, filter="data")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the returned files go")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole session (default 540)")
    parser.add_argument("--carry", type=Path, help="the folder holding the last session's carry-NN.tar files")
    parser.add_argument("--data", type=Path, help="cifar10-jpeg.tar.gz (default: shared/data or ../shared/data)")
    parser.add_argument("--work", default="runs/gpu-call", help="where the runs are trained")
    parser.add_argument("--rehearsal", action="store_true", help="the same steps on the CPU, bundled sample, tiny")
    args = parser.parse_args(argv)
    session = Session(args)
    if args.carry:
        unpack_carry(session, args.carry)
    environment(session)
    data = data_args(session, args.data)
    for name in STEPS:
        run_step(session, name, data)
    pack_carry(session)


if __name__ == "__main__":
    main()
