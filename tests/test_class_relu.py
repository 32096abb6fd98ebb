"""A run whose class ReLU is shut for a whole epoch says so and ends, instead of training at chance."""

import math

import pytest
from typer.testing import CliRunner

from allconv_cli.cli import app
from allconv_cli.train import ClassReluShut, loop, settings, train
from allconv_cli.train import run as train_run


@pytest.fixture
def shut_start(monkeypatch):
    """Every run starts with the class conv's biases at -1000: its ReLU is shut on every image."""
    real = train_run.initialize

    def shut(model, kind, images):
        real(model, kind, images)
        model.get_classifier().bias.data.fill_(-1000.0)

    monkeypatch.setattr(train_run, "initialize", shut)


# the paper's network (no BatchNorm) and SGD, as the faithful preset trains them
TINY = dict(train_limit=64, test_limit=16, batch_size=16, epochs=3, warmup_epochs=0.0)


def test_a_shut_class_relu_ends_the_run_after_its_first_epoch(shut_start, tmp_path):
    with pytest.raises(ClassReluShut, match=r"shut on every training image for all of epoch 1 .*= ln 10\)"):
        train(settings.resolve("faithful", **TINY), tmp_path / "run")
    [line] = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()  # the figures it has
    assert '"train_loss": 2.302585' in line


def test_the_command_says_it_in_one_line(shut_start, tmp_path):
    result = CliRunner().invoke(app, ["train", "--preset", "faithful", "--train-limit", "64", "--test-limit", "16",
                                      "--batch-size", "16", "--epochs", "3", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "--weight-init xavier-open" in error and "--no-class-relu" in error


def test_a_run_at_chance_that_still_learns_is_left_alone(tmp_path):
    class Model:
        class_relu, num_classes = True, 10

    near = {"epoch": 1, "train_loss": math.log(10) + 1e-4}
    loop._refuse_a_shut_class_relu(Model(), near, tmp_path)  # scores that differ: the run goes on
    Model.class_relu = False
    loop._refuse_a_shut_class_relu(Model(), {"epoch": 1, "train_loss": math.log(10)}, tmp_path)


def test_an_ablation_records_a_shut_run_as_its_result(shut_start, tmp_path):
    from allconv_cli import ablate

    rows = ablate.ablate(settings.resolve("faithful", **TINY), ["all-cnn-c"], [0.05], [0], tmp_path / "ablation", jobs=1)
    result = (tmp_path / "ablation" / "all-cnn-c" / "lr0.05-seed0" / ablate.RESULT_NAME).read_text()
    assert '"class_relu_shut": "the ReLU after the class conv was shut' in result and '"epochs": 1' in result
    assert rows[0]["test_error_mean"] >= 50  # every image called class 0


def test_a_run_that_ends_at_chance_says_so_after_its_figures(monkeypatch, tmp_path):
    """Class scores that start at 0 and barely move (no class ReLU, so nothing is shut): the run
    finishes, prints its table, then one line that it has not begun to learn."""
    real = train_run.initialize

    def flat(model, kind, images):
        real(model, kind, images)
        model.get_classifier().weight.data.zero_()
        model.get_classifier().bias.data.zero_()

    monkeypatch.setattr(train_run, "initialize", flat)
    result = CliRunner().invoke(app, ["train", "--preset", "faithful", "--train-limit", "64", "--test-limit", "16",
                                      "--batch-size", "16", "--epochs", "3", "--lr", "1e-9", "--no-class-relu",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    # its second line names the recipe's deviations from the paper, with the way back
    second = result.stderr.splitlines()[1]
    assert second.startswith("Deviations from the paper's recipe (Section 3.2): --no-class-relu (paper: on), ")
    assert "--schedule cosine (paper: paper)" in second and "--preset paper-cifar10 " in second
    [note] = [line for line in result.stderr.splitlines() if line.startswith("Note:")]
    assert "Note:" not in result.stdout  # stdout holds the results alone
    assert "(ln 10 = 2.303): this run has not begun to learn" in note and "leave out --preset faithful" in note


def test_only_a_loss_near_ln_k_counts_as_not_learning():
    assert "default recipe" in loop.not_learning({"epoch": 3, "train_loss": 4.601}, 100, False)  # faithful, glyphs-100
    assert "default recipe" not in loop.not_learning({"epoch": 3, "train_loss": 2.30}, 10, True)  # it is the default
    # one or two epochs are no learning test: a smoke run (1 epoch, 256 images) stays quiet
    assert loop.not_learning({"epoch": 2, "train_loss": 2.30}, 10, True) is None
    assert loop.not_learning({"epoch": 3, "train_loss": 0.95 * math.log(10)}, 10, False) is None
    assert loop.not_learning({"epoch": 3, "train_loss": 1.05 * math.log(10)}, 10, False) is None
    assert loop.not_learning({"epoch": 1, "train_loss": 0.0}, 1, False) is None  # one class: nothing to guess
