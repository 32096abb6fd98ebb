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
    learning curves' title and eval all say all-cnn-c."""
    run = tmp_path / "first"
    trained = invoke("train", "--model", "all_cnn_c", *QUICK, "--epochs", "2", "--stop-after", "1", "--out", run)
    assert trained.output.startswith("all-cnn-c on sample: 32 training images"), trained.output
    assert "all-cnn-c on sample: 1/2 epochs" in trained.output
    assert json.loads((run / "config.json").read_text())["model"] == "all-cnn-c"
    summary = json.loads(invoke("train", "--resume", run, "--json").stdout)
    assert summary["model"] == "all-cnn-c"
    evaluated = invoke("eval", run, "--limit", "16", "--device", "cpu")
    assert "all-cnn-c (epoch 2) on sample test" in evaluated.stdout
    assert json.loads(invoke("eval", run, "--limit", "16", "--device", "cpu", "--json").stdout)["model"] == "all-cnn-c"
    everything = trained.output + evaluated.output + " ".join(fig.get_suptitle() for fig in drawn)
    assert "all_cnn_c" not in everything
    assert drawn[0].get_suptitle() == "first: all-cnn-c on sample"


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


# Issue #58: stdout carries results alone (the table, the files written, or --json); headers, the
# deviations line, epoch lines, progress, estimates, notes and warnings go to stderr.
DOCS = REPO / "docs"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tiny") / "run"
    invoke("train", *QUICK, "--out", run)
    return run


def json_calls(run: Path, out: Path) -> dict:
    """A quick call of every command with --json."""
    return {
        "models": ["models"],
        "train": ["train", *QUICK, "--out", out / "run"],
        "eval": ["eval", run, "--limit", "16", "--device", "cpu"],
        "export": ["export", run, "--format", "safetensors", "--out", out / "export"],
        "ablate": ["ablate", "--models", "all-cnn-c", *QUICK, "--out", out / "ablation"],
        "visualize": ["visualize", DOCS / "chelsea.png", "--device", "cpu", "--out", out / "grid.png"],
        "sanity": ["sanity", DOCS / "chelsea.png", "--methods", "guided", "--device", "cpu", "--out", out / "sanity"],
        "faithfulness": ["faithfulness", "--limit", "2", "--methods", "sobel", "--steps", "2", "--device", "cpu",
                         "--out", out / "faithfulness.png"],
        "benchmark": ["benchmark", "--steps", "1", "--warmup", "1", "--mode", "infer", "--batch-size", "8",
                      "--device", "cpu"],
    }


def test_every_command_is_covered_by_the_stdout_test(tmp_path):
    assert sorted(json_calls(tmp_path, tmp_path)) == sorted(c.name for c in app.registered_commands)


@pytest.mark.parametrize("command", list(json_calls(Path(), Path())))
def test_stdout_of_json_is_json_alone(command, tiny_run, tmp_path):
    """`allconv COMMAND --json | jq` works: whatever a command says while it works is on stderr."""
    result = invoke(*json_calls(tiny_run, tmp_path)[command], "--json")
    json.loads(result.stdout)  # nothing before or after the JSON
    if command == "train":
        assert result.stderr.startswith("all-cnn-c on sample: 32 training images") and "epoch 1/1: " in result.stderr
        assert "Deviations from the paper's recipe" in result.stderr


def test_train_prints_its_table_on_stdout_and_its_progress_on_stderr(tmp_path):
    result = invoke("train", *QUICK, "--out", tmp_path / "run")
    out, err = result.stdout.splitlines(), result.stderr.splitlines()
    assert err[0].startswith("all-cnn-c on sample: 32 training images, 2 steps an epoch, cpu")
    assert err[1].startswith("Deviations from the paper's recipe") and err[2].startswith("epoch 1/1: train loss")
    assert "all-cnn-c on sample: 1/1 epoch in" in result.stdout  # one epoch, not "1/1 epochs"
    assert f"run folder: {tmp_path / 'run'} (finished)" in out[-1]
    assert not any(line.startswith(("epoch ", "Deviations", "all-cnn-c on sample: 32")) for line in out)


def test_a_smoke_run_says_nothing_about_learning(tmp_path):
    """One epoch on 256 images is no learning test: the note waits for the third epoch."""
    result = invoke("train", "--preset", "smoke", "--device", "cpu", "--out", tmp_path / "run")
    assert "Note:" not in result.output and "has not begun to learn" not in result.output
    assert "1 epochs" not in result.output


# Issue #58: a help page a person reads at 80 columns.
def help_text(*command: str, columns: int = 80) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_train_help_reads_at_80_columns_in_panels_by_concern():
    from allconv_cli.train.fields import PANELS

    lines = help_text("train").splitlines()
    assert max(map(len, lines)) <= 80
    assert len(lines) <= 230, f"allconv train --help is {len(lines)} lines at 80 columns (516 before issue #58)"
    panels = [re.match(r"╭─ (.+?) ─", line).group(1) for line in lines if line.startswith("╭─ ")]
    assert panels == ["Options", *PANELS]


def test_each_settings_help_is_one_short_sentence_and_docs_training_has_the_rest():
    from allconv_cli.train.config import FIELDS

    details = (REPO / "docs" / "training.md").read_text().split("## Every setting")[1].split("\n## ")[0]
    for name, field in FIELDS.items():
        words = re.sub(r"^With --optimizer [\w-]+: ", "", field.metadata["help"])
        assert len(words) <= 70 and words.endswith(".") and ". " not in words[:-1], (name, words)
        assert f"`--{name.replace('_', '-')}`" in details, f"docs/training.md: add --{name} to 'Every setting'"


@pytest.mark.parametrize("command", [None, *(c.name for c in app.registered_commands)])
def test_no_flag_shows_a_value(command):
    """--help, --install-completion, --json, --force ... take no value, and show none."""
    assert "<bool>" not in help_text(*([command] if command else []), columns=200)


def test_the_first_example_of_train_help_is_the_readmes_offline_one():
    """The README's first command, which tests/test_readme.py runs offline on the bundled sample."""
    doc = next(c for c in app.registered_commands if c.name == "train").callback.__doc__
    first = re.search(r"\[bold\](.+?)\[/bold\]", doc).group(1)
    assert f"pipx install . && {first}\n" in (REPO / "README.md").read_text()


def test_the_readme_and_the_help_list_the_same_commands_in_one_order_and_the_same_presets():
    from allconv_cli.train.config import list_presets

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Commands")[1].split("\n## ")[0]
    in_readme = list(dict.fromkeys(re.findall(r"^allconv (\w+)", section, flags=re.M)))
    top = help_text(columns=120).split("╭─ Commands")[1]
    in_help = re.findall(r"^│ (\w+) ", top, flags=re.M)
    assert in_readme == in_help == [c.name for c in app.registered_commands]
    mentioned = set(re.findall(r"`([\w-]+)`", readme)) | set(re.findall(r"--preset ([\w-]+)", readme))
    assert {p for p in mentioned if (REPO / "presets" / f"{p}.toml").exists()} == set(list_presets())
    assert all((REPO / "presets" / f"{p}.toml").exists() for p in re.findall(r"--preset ([\w-]+)", readme))
    bundled = " ".join(help_text("train", columns=300).split()).split("Bundled: ")[1].split(". Default")[0]
    assert bundled.split(", ") == list_presets()


@pytest.mark.parametrize(("count", "noun", "text"), [(1, "epoch", "1 epoch"), (3, "epoch", "3 epochs"),
                                                     (1000, "image", "1,000 images"), (0, "map", "0 maps")])
def test_counts_agree_with_their_nouns(count, noun, text):
    from allconv_cli.util import plural

    assert plural(count, noun) == text


def test_one_image_is_one_image(tmp_path):
    """The header, eval's title and faithfulness's count say "1 training image", "1 image"."""
    run = tmp_path / "run"
    trained = invoke("train", *QUICK, "--train-limit", "1", "--test-limit", "1", "--batch-size", "1", "--out", run)
    assert "all-cnn-c on sample: 1 training image, 1 step an epoch" in trained.stderr
    assert "1 image," in invoke("eval", run, "--limit", "1", "--device", "cpu").stdout
    scored = invoke("faithfulness", DOCS / "chelsea.png", "--methods", "sobel", "--steps", "2", "--device", "cpu",
                    "--out", tmp_path / "f.png")
    assert "scoring 1 image file, 1 map each" in scored.stderr


def test_options_that_are_not_settings_read_the_same_in_every_command():
    """Issue #56: --json, --force, --device and --quiet are declared once, with one help text."""
    import typer

    helps: dict[str, set] = {}
    for command in typer.main.get_command(app).commands.values():
        for param in command.params:
            if param.name in ("as_json", "force", "device", "quiet") or "--out" in param.opts:
                text = (param.help or "").split(" Default: ")[0]  # a setting's option names its default
                helps.setdefault(param.name, set()).add(text if param.name != "out" else tuple(param.opts))
    assert {name: len(texts) for name, texts in helps.items()} == {
        "as_json": 1, "force": 1, "device": 1, "quiet": 1, "out": 1}, helps
