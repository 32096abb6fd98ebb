"""Every text file allconv reads is read as a user's editor may have saved it: UTF-8 with or
without a byte-order mark, lines ending in \\n, \\r\\n or \\r (issue #46). One reader,
``util.read_text``, serves presets, a run folder's config.json and an export's config.json; each
kind is tested here through the command a user gives it to."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.files.loading import BUNDLED_WEIGHTS
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.run_folder import RunFolder
from allconv_cli.util import read_text

runner = CliRunner()
BOM = b"\xef\xbb\xbf"
# The ways an editor ends its lines: Unix, Windows, classic Mac OS; each with and without a BOM.
SAVED_AS = [(bom, end) for bom in (b"", BOM) for end in (b"\n", b"\r\n", b"\r")]
IDS = [f"{'bom' if bom else 'no-bom'}-{end!r}" for bom, end in SAVED_AS]


def save(path: Path, text: str, bom: bytes, end: bytes) -> Path:
    """``text`` (\\n line ends) written as an editor that puts ``bom`` first and ends lines in ``end``."""
    path.write_bytes(bom + text.encode("utf-8").replace(b"\n", end))
    return path


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.mark.parametrize(("bom", "end"), SAVED_AS, ids=IDS)
def test_read_text_takes_any_byte_order_mark_and_line_end(tmp_path, bom, end):
    text = 'model = "all-cnn-c"  # café\nepochs = 2\n'
    assert read_text(save(tmp_path / "a.toml", text, bom, end)) == text


def test_read_text_still_refuses_what_is_not_utf8(tmp_path):
    (tmp_path / "latin1.toml").write_bytes("lr = 0.1 # café\n".encode("latin-1"))
    with pytest.raises(UnicodeDecodeError):
        read_text(tmp_path / "latin1.toml")


PRESET = '''# saved by an editor on Windows
model = "all-cnn-c"
batch_norm = true
train_limit = 32
test_limit = 16
batch_size = 16
epochs = 1
'''


@pytest.mark.parametrize(("bom", "end"), [(BOM, b"\r\n"), (BOM, b"\r")], ids=["bom-crlf", "bom-cr"])
def test_a_preset_saved_with_a_bom_trains(tmp_path, bom, end):
    preset = save(tmp_path / "mine.toml", PRESET, bom, end)
    result = invoke("train", "--preset", preset, "--device", "cpu", "--out", tmp_path / "run", "--json")
    summary = json.loads(result.stdout)
    assert summary["epochs_done"] == 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["train_limit"], config["batch_size"], config["batch_norm"]) == (32, 16, True)


def test_a_preset_saved_with_a_bom_benchmarks(tmp_path):
    preset = save(tmp_path / "mine.toml", PRESET, BOM, b"\r\n")
    result = invoke("benchmark", "--preset", preset, "--mode", "data", "--steps", "1", "--warmup", "1",
                    "--device", "cpu", "--json")
    assert json.loads(result.stdout)["batch_size"] == 16


@pytest.mark.parametrize(("bom", "end"), SAVED_AS, ids=IDS)
def test_a_run_folders_config_json_edited_in_any_editor_is_read(tmp_path, bom, end):
    config = TrainConfig(epochs=3, lr=0.1, milestones=[1, 2], schedule="paper")
    save(tmp_path / "config.json", config.to_json(), bom, end)
    assert RunFolder(tmp_path).read_config() == config


def test_an_export_folder_whose_config_json_was_resaved_is_still_ours(tmp_path):
    """--force replaces an earlier allconv export folder only: it is recognized by its config.json."""
    out = tmp_path / "export"
    invoke("export", BUNDLED_WEIGHTS, "--format", "safetensors", "--out", out)
    config = out / "config.json"
    save(config, json.dumps(json.loads(config.read_text()), indent=2), BOM, b"\r\n")
    invoke("export", BUNDLED_WEIGHTS, "--format", "safetensors", "--out", out, "--force")
    assert not config.read_bytes().startswith(BOM)  # replaced by a fresh export
