import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from allconv_cli import __version__
from allconv_cli.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"allconv {__version__}"


def test_models_table_and_json():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "1,369,738" in result.output and "all-cnn-c" in result.output
    rows = json.loads(runner.invoke(app, ["models", "--json"]).output)
    by_name = {row["name"]: row for row in rows}
    assert by_name["all-cnn-c"]["params"] == 1_369_738
    assert by_name["all-cnn-c"]["paper_error"]["cifar100"] == 33.71
    assert by_name["model-c"]["layer_names"][-1] == "conv7"


def test_models_one_model():
    result = runner.invoke(app, ["models", "all-cnn-c", "--num-classes", "100", "--json"])
    (row,) = json.loads(result.output)
    assert row["params"] == 1_387_108


def test_unknown_model_is_one_line_exit_2():
    result = runner.invoke(app, ["models", "all-cnn-x"])
    assert result.exit_code == 2
    assert "did you mean 'all-cnn-c'" in result.output
    assert "Traceback" not in result.output


def test_help_does_not_import_torch():
    code = ("import sys; from allconv_cli.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_every_command_help_has_an_example():
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert "models" in commands
    for command in commands:
        text = runner.invoke(app, [command, "--help"]).output
        assert "Example" in text, command


MINE = ("models", "eval", "ablate", "export")


def click_command(name):
    import typer

    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("command", [None, *MINE])
def test_help_states_each_default_once_and_shows_no_bool_metavar(command):
    params = (typer.main.get_command(app) if command is None else click_command(command)).params
    for param in params:
        if param.name == "help":
            continue  # Typer's own option
        text = (param.help or "").lower()
        shown = param.show_default is not False and param.default not in (None, False)
        assert not (shown and "default" in text), (command, param.name, text)
    text = runner.invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "100"}).output
    rows = [line for line in text.splitlines() if "<bool>" in line]
    # what is left is Typer's own --help (and --install/--show-completion on the app)
    assert all(any(own in row for own in ("--help", "-completion")) for row in rows), rows


@pytest.mark.parametrize("command", MINE)
def test_help_wraps_at_the_terminal_width(command):
    doc = click_command(command).callback.__doc__
    assert all("\n" not in paragraph.strip() for paragraph in doc.split("\n\n"))  # no hard line break
    for width in (60, 160):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": str(width)}).output
        assert max(map(len, text.splitlines())) <= width


def test_seeds_help_reads_once():
    text = runner.invoke(app, ["ablate", "--help"], env={"COLUMNS": "200"}).output
    line = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("--seeds"))
    assert "How many seeds, e.g. 3 (seeds 0, 1 and 2), or which, e.g. 0,4,7. [default: 1]" in line


def test_models_piped_to_a_file_is_not_wrapped(tmp_path):
    with open(tmp_path / "out.txt", "w") as out:
        subprocess.run([str(Path(sys.executable).parent / "allconv"), "models"], stdout=out, check=True,
                       env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert any("all-cnn-imagenet" in line and "conv1..conv12" in line for line in lines)
    assert "pretrained: all_cnn_c_bn.cifar10, the bundled weights (All-CNN-C with BatchNorm): " \
           "timm.create_model('all_cnn_c_bn', pretrained=True)" in lines


@pytest.mark.parametrize("seconds, text", [(12.4, "12 s"), (200, "3 min 20 s"), (3725, "1 h 02 min"),
                                           (90_000, "1 d 1 h")])
def test_durations(seconds, text):
    from allconv_cli.cli.common import duration as _duration

    assert _duration(seconds) == text
