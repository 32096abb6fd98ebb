"""Every count option is bounded by what can mean anything (issue #48): a value past the bound is
one line naming it and exit 2, before any work (no list of a billion seeds, no million workers)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

import allconv_cli
from allconv_cli.cli import app

WEIGHTS = str(Path(allconv_cli.__file__).parent / "assets" / "all-cnn-c-cifar10.safetensors")
ABLATE = ["ablate", "--models", "all-cnn-c", "--preset", "smoke"]

CASES = {
    "seeds count": ([*ABLATE, "--seeds", "1000000000", "--dry-run"], "a count of seeds takes 1 to 1,000"),
    "no seeds": ([*ABLATE, "--seeds", "0", "--dry-run"], "--seeds 0 is not allowed"),
    "a seed twice": ([*ABLATE, "--seeds", "3,3", "--dry-run"], "different seeds"),
    "a negative seed": ([*ABLATE, "--seeds", "-1,2", "--dry-run"], "seed = -1 is not allowed"),
    "jobs": ([*ABLATE, "--jobs", "100000"], "--jobs 100000 is not allowed; --jobs takes 1 to"),
    "workers": (["train", "--preset", "smoke", "--workers", "100000"], "--workers takes a whole number from 0 to 256"),
    "benchmark steps": (["benchmark", "--preset", "smoke", "--steps", "1000000000"], "--steps must be from 1 to 100,000"),
    "benchmark warm-up": (["benchmark", "--preset", "smoke", "--warmup", "1000000000"], "--warmup must be from 0 to 100,000"),
    "eval batch": (["eval", WEIGHTS, "-d", "sample", "--batch-size", "0"], "--batch-size 0 is not allowed"),
    "eval limit": (["eval", WEIGHTS, "-d", "sample", "--limit", "-5"], "--limit -5 is not allowed"),
    "stop after none": (["train", "--preset", "smoke", "--stop-after", "0"], "--stop-after 0 is not allowed"),
    "stop after past the run": (["train", "--preset", "smoke", "--stop-after", "5"], "it takes 1 to the run's 1 epochs"),
    "classes": (["models", "all-cnn-c", "--num-classes", "1000000000"], "it takes 2 to 100,000 classes"),
    "one class": (["models", "all-cnn-c", "--num-classes", "1"], "--num-classes 1 is not allowed"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_count_past_its_bound_is_one_line(tmp_path, case):
    args, expected = CASES[case]
    writes = args[0] in ("ablate", "train", "eval")  # the commands with an --out
    result = CliRunner().invoke(app, [*args, *(["--out", str(tmp_path / "out")] if writes else [])])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ") and expected in result.stderr
    assert not (tmp_path / "out").exists()
