"""The rehearsal of the GPU call (scripts/gpu_call.py): the same steps on the CPU with the
bundled sample and tiny sizes, two calls, so the call cannot rot between GPU runs."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_call.py"


def call(env: dict, out: Path, work: Path, *extra) -> list[dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--rehearsal", "--budget", "300", "--out", str(out),
                           "--work", str(work), *map(str, extra)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_rehearsal_writes_the_call_files_and_a_second_call_continues(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = call(env, tmp_path / "out1", tmp_path / "work1")
    files = sorted((tmp_path / "out1").iterdir())
    names = [p.name for p in files]
    parts = [n for n in names if n.startswith("carry-")]
    # what a device returns: at most 8 files of at most 16 MiB; the paper run's state (ZCA) needs 3 parts
    assert names == [*parts, "log.txt", "results.jsonl", "runs-small.tar.gz", "weights.tar"], names
    assert 1 <= len(parts) <= 4 and len(names) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files)
    steps = {entry["step"]: entry for entry in first}
    assert steps["environment"]["rehearsal"] and steps["environment"]["packages"]["torch"]
    assert steps["gpu-tests"]["rc"] == 0  # every test marked gpu, skipped without CUDA
    assert steps["bench-b32"]["rc"] == 0 and steps["bench-b32"]["out"]["results"]["train"]["images_per_s"] > 0
    assert steps["bench-fast-recipe"]["out"]["finished"]
    assert steps["plan"]["fast_seeds"] == 1 and "why" in steps["plan"]
    assert steps["fast-protocol"]["rc"] == 0 and len(steps["fast-protocol"]["out"]) == 2  # two networks' rows
    paper = steps["paper-protocol"]
    assert paper["stopped"]  # 100 epochs do not fit: stopped by the guard, resumably
    with tarfile.open(tmp_path / "out1" / "runs-small.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("fast-protocol/table.json") for n in names)
    assert not any(n.endswith(("state.pt", "model.safetensors")) for n in names)
    with tarfile.open(tmp_path / "out1" / "weights.tar") as tar:
        assert len([n for n in tar.getnames() if n.endswith("model-fp16.safetensors")]) == 2
    carried = steps["carry"]["carried"]
    assert [c["run"] for c in carried] == ["runs/paper-protocol/all-cnn-c/lr0.05-seed0"], steps["carry"]

    second = call(env, tmp_path / "out2", tmp_path / "work2", "--carry", tmp_path / "out1")
    steps2 = {entry["step"]: entry for entry in second}
    assert "bench-b32" not in steps2 and "fast-protocol" not in steps2  # done in the first call
    assert steps2["paper-protocol"]["stopped"]
    after = {c["run"]: c["done"] for c in steps2["carry"]["carried"]}
    assert after["runs/paper-protocol/all-cnn-c/lr0.05-seed0"] > carried[0]["done"]  # it went on from there
