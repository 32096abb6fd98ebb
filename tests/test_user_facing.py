"""What a user reads (issue #46): one spelling of model names, titled learning curves with
whole-epoch ticks, `allconv models` as docs/models.md shows it, help summaries that end on a
full sentence."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allconv_cli import charts
from allconv_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
QUICK = ["--preset", "smoke", "--train-limit", "32", "--test-limit", "16", "--batch-size", "16", "--device", "cpu"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The matplotlib figures the commands draw, kept open to be read (charts._save writes them)."""
    figures = []
    monkeypatch.setattr(charts, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def test_a_model_is_named_as_users_type_it_in_every_line_and_file(tmp_path, drawn):
    """Given as all_cnn_c (the Python name), the run's first line, its summary, config.json, the
    learning curves' title and eval all say all-cnn-c, and name the network as built (smoke's
    BatchNorm)."""
    run = tmp_path / "first"
    trained = invoke("train", "--model", "all_cnn_c", *QUICK, "--epochs", "2", "--stop-after", "1", "--out", run)
    assert trained.output.startswith("all-cnn-c (BatchNorm) on sample: 32 training images"), trained.output
    assert "all-cnn-c (BatchNorm) on sample: 1/2 epochs" in trained.output
    assert json.loads((run / "config.json").read_text())["model"] == "all-cnn-c"
    summary = json.loads(invoke("train", "--resume", run, "--json").stdout)
    assert summary["model"] == "all-cnn-c"
    evaluated = invoke("eval", run, "--limit", "16", "--device", "cpu")
    assert "all-cnn-c (BatchNorm) (epoch 2) on sample test" in evaluated.stdout
    assert json.loads(invoke("eval", run, "--limit", "16", "--device", "cpu", "--json").stdout)["model"] == "all-cnn-c"
    everything = trained.output + evaluated.output + " ".join(fig.get_suptitle() for fig in drawn)
    assert "all_cnn_c" not in everything
    assert drawn[0].get_suptitle() == "first: all-cnn-c (BatchNorm) on sample"


def test_learning_curves_are_titled_and_ticked_at_whole_epochs(drawn, tmp_path):
    for epochs in (1, 3, 12):
        history = [{"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 10.0 + e, "test_loss": 2.1 / e,
                    "test_top1_error": 90.0 - e} for e in range(1, epochs + 1)]
        charts.learning_curves(history, tmp_path / "curves.png", title="run: all-cnn-c on sample")
        figure = drawn[-1]
        assert figure.get_suptitle() == "run: all-cnn-c on sample"
        for ax in figure.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), (epochs, ticks)


def test_docs_show_the_models_table_as_the_command_prints_it():
    printed = "\n".join(line.rstrip() for line in invoke("models").stdout.strip("\n").splitlines())
    docs = "\n".join(line.rstrip() for line in (REPO / "docs" / "models.md").read_text().splitlines())
    assert printed in docs, "docs/models.md: paste the output of `allconv models` again"
    hundred = invoke("models", "--num-classes", "100").stdout
    count = re.search(r"all-cnn-c\s+([\d,]+)", hundred).group(1)
    assert f"K = 100: {count}" in docs
    errors = next(r for r in json.loads(invoke("models", "--json").stdout) if r["name"] == "all-cnn-c")["paper_error"]
    assert f"{errors['cifar10-aug']:.2f} %" in docs and f"{errors['cifar100']:.2f} %" in docs


# The explain commands' own help is checked where they are written (tests/test_visualize_cli.py).
@pytest.mark.parametrize("command", ["models", "train", "eval", "ablate", "export", "benchmark"])
def test_a_commands_summary_is_one_paragraph_of_whole_sentences(command):
    """`allconv --help` shows the first paragraph of each command's help: no line break inside it
    (rich keeps them, breaking a sentence in two), and it ends a sentence."""
    info = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    summary = info.callback.__doc__.strip().split("\n\n")[0]
    assert "\n" not in summary and summary.rstrip().endswith((".", ")")), summary
