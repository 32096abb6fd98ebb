"""The rehearsal of a GPU session (scripts/gpu_call.py): the same steps on the CPU with the bundled
sample at tiny sizes, two sessions, the second continuing from the first's carry."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_call.py"


def session(out: Path, work: Path, budget: int, *extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--rehearsal", "--budget", str(budget), "--out", str(out),
                           "--work", str(work), *map(str, extra)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {entry["step"]: entry for entry in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def epochs_done(work: Path) -> dict[str, int]:
    return {str(p.parent.relative_to(work)): len(p.read_text().splitlines()) for p in work.rglob("metrics.jsonl")}


@pytest.mark.slow
def test_a_session_stops_at_its_budget_and_the_next_continues_from_its_carry(tmp_path):
    first = session(tmp_path / "out1", tmp_path / "work1", 60)
    assert first["environment"]["rehearsal"] and first["environment"]["versions"]["torch"]
    pair = first["pair"]
    assert pair["rc"] == 124 and "--time-limit" in pair["cmd"]  # 100 epochs never fit: stopped resumably
    assert "skipped" in first["family-c"]  # the pair took the session
    files = sorted(p.name for p in (tmp_path / "out1").iterdir())
    parts = [f"carry-{i:02d}.tar" for i in range(first["carry"]["parts"])]  # a run's state is 11 MB
    assert files == [*parts, "log.txt", "results.jsonl"] and 1 <= len(parts) <= 4
    assert all((tmp_path / "out1" / name).stat().st_size <= 16 * 2**20 for name in files)
    with tarfile.open(fileobj=io.BytesIO(b"".join((tmp_path / "out1" / p).read_bytes() for p in parts))) as tar:
        names = tar.getnames()
    assert not any(n.endswith("model.safetensors") for n in names)
    started = [n for n in names if n.endswith("state.pt")]
    assert started and all(n.startswith("pair/all-cnn-c/batch_size=") for n in started)
    before = epochs_done(tmp_path / "work1")

    second = session(tmp_path / "out2", tmp_path / "work2", 60, "--carry", tmp_path / "out1")
    assert second["pair"]["rc"] == 124
    after = epochs_done(tmp_path / "work2")
    assert any(after[run] > done for run, done in before.items())  # a carried run went on from where it stopped
