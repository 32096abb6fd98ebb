import json
import subprocess
import sys

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
