"""The README as a newcomer follows it (issue #46): in a fresh copy of the repository, every
`allconv` example of the README runs from the copy's root, in the README's order, leaves nothing
that `git status` shows, and the tests that a stray output once broke still pass there."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allconv_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Smaller budgets for the examples, appended to each (a later option wins): the test checks that
# every example runs and writes where the README says, not what a full-size run measures.
BUDGETS = {
    "models": [],
    "train": ["--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--batch-size", "32", "--device", "cpu"],
    "eval": ["--limit", "32", "--device", "cpu"],
    "export": [],
    "ablate": ["--batch-size", "8", "--device", "cpu"],
    "visualize": ["--device", "cpu"],
    "sanity": ["--methods", "guided", "--device", "cpu"],
    "faithfulness": ["--limit", "4", "--methods", "guided,sobel", "--steps", "4", "--device", "cpu"],
    "benchmark": ["--steps", "1", "--warmup", "1", "--mode", "infer", "--batch-size", "8", "--device", "cpu"],
}
# Tests that read or write the working directory's outputs: one once failed after the README's
# `allconv visualize` example had left grid.png in the checkout.
CWD_TESTS = ["tests/test_bad_input.py::test_a_folder_given_as_an_image"]


def readme_examples(text: str) -> list[list[str]]:
    """The `allconv` commands of the README's bash blocks, in order, as argument lists (after the
    `allconv`); a line such as `pipx install . && allconv train ...` gives its allconv part."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["allconv"]:
                    commands.append(words[1:])
    return commands


def fresh_copy(target: Path) -> Path:
    """The checkout's files as a clone has them (tracked, or new and not ignored), without the
    outputs and environments that .gitignore keeps out of a clone."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, text=True) if shutil.which("git") else None
    if listed is None or listed.returncode != 0:  # not a git checkout (an unpacked archive): all but the usual
        ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache")
        shutil.copytree(REPO, target, ignore=ignore)
        return target
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def test_the_readme_has_at_most_250_lines_and_every_example_has_a_budget():
    lines = README.read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move details to docs/"
    commands = [words[0] for words in readme_examples(README.read_text())]
    assert commands[0] == "train" and set(commands) == set(BUDGETS), commands
    assert readme_examples("```bash\npipx install . && allconv train --epochs 3  # three\n```") == [["train", "--epochs", "3"]]


@pytest.mark.slow
def test_the_readme_examples_run_in_a_fresh_copy_and_leave_it_clean(tmp_path, monkeypatch):
    copy = fresh_copy(tmp_path / "allconv")
    git = shutil.which("git")
    if git:  # a clone's state: every file known to git, so that what the examples write shows up
        quiet = {"cwd": copy, "capture_output": True, "check": True}
        subprocess.run([git, "init", "-q"], **quiet)
        subprocess.run([git, "add", "-A"], **quiet)
    monkeypatch.chdir(copy)
    runner = CliRunner()
    for words in readme_examples((copy / "README.md").read_text()):
        result = runner.invoke(app, [*words, *BUDGETS[words[0]]])
        assert result.exit_code == 0, (words, result.output, result.exception)
    for written in ("runs/first/model.safetensors", "runs/first/confusion-sample-test.png", "runs/first/model.onnx",
                    "runs/smoke/curves.png", "chelsea-conv6.png", "sanity/similarity.png", "faithfulness.png"):
        assert (copy / written).is_file(), f"the README says an example writes {written}"
    if git:
        status = subprocess.run([git, "status", "--porcelain", "--untracked-files=all"], cwd=copy,
                                capture_output=True, text=True, check=True).stdout
        assert not [line for line in status.splitlines() if line.startswith("??")], status
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CWD_TESTS], cwd=copy,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file_and_heading():
    """Moving text between README.md and docs/ keeps its links: files exist, #anchors are headings."""
    def anchors(page: Path) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    broken = []
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.name}: {target}")
    assert not broken, broken


def test_the_ci_runs_the_readmes_test_command():
    """.ci/run deletes .venv, then runs the README's test line as it is written there."""
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].startswith("python3 -m venv .venv && ") and "pytest -q" in ci[-1]
    assert f"```bash\n{ci[-1]}\n```" in README.read_text()
    assert "rm -rf .venv" in ci and "deletes `.venv`" in README.read_text()
