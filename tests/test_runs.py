"""Run folders that are never lost: stops at any step, one writer, kills, full disks, DDP stops."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from allconv_cli import train as trainer
from allconv_cli.cli import app
from allconv_cli.data import preprocess as preprocessing
from allconv_cli.data.preprocess import digest
from allconv_cli.files import weights as checkpoint
from allconv_cli.train import RunFolder, TrainingDiverged, TrainingStopped, train
from allconv_cli.train import settings as configuration
from allconv_cli.train import step as train_step

runner = CliRunner()
ALLCONV = str(Path(sys.executable).parent / "allconv")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code, *needles):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("Error:") and sum(line.startswith("Error:") for line in lines) == 1, result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def tiny(**kwargs):
    """2 steps of 32 sample images an epoch, 2 epochs, BatchNorm: about a second an epoch here."""
    settings = dict(batch_norm=True, train_limit=64, test_limit=32, batch_size=32, epochs=2, lr=0.05,
                    warmup_epochs=0.5, seed=3, precision="fp32")
    settings.update(kwargs)
    return configuration.resolve(None, **settings)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def stop_at(epoch: int, step: int):
    """A progress callback that sends this process SIGINT once the loop reports (epoch, step)."""
    def progress(event, **fields):
        if event == "step" and (fields["epoch"], fields["step"]) == (epoch, step):
            os.kill(os.getpid(), signal.SIGINT)
    return progress


FIVE_STEPS = dict(train_limit=160)  # 5 steps an epoch


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of tiny(**FIVE_STEPS), shared by the stop tests."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(**FIVE_STEPS), run)
    return run


@pytest.mark.parametrize("epoch, step", [(0, 3), (0, 5), (1, 1)], ids=["middle", "last-step", "first-step"])
def test_a_stop_at_any_step_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, straight, epoch, step):
    monkeypatch.setattr("allconv_cli.train.loop.CHECK_EVERY", 1)  # report (and so stop) after every step
    monkeypatch.setattr("allconv_cli.train.loop.CHECK_SECONDS", 0)
    config = tiny(**FIVE_STEPS)
    with pytest.raises(TrainingStopped):
        train(config, tmp_path / "split", progress=stop_at(epoch, step))
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    # a stop in an epoch's last step waits for its end: no state sits between a last step and its evaluation
    assert (state["epoch"], state["step"]) == ((epoch, step) if step < 5 else (epoch + 1, 0))
    summary = trainer.resume(tmp_path / "split")
    assert summary["finished"] and same_weights(straight, tmp_path / "split")


def test_a_stop_between_lookahead_syncs_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """The slow copy is part of the state: a stop at step 3 of 5 (before the first sync) resumes exactly."""
    monkeypatch.setattr("allconv_cli.train.loop.CHECK_EVERY", 1)
    monkeypatch.setattr("allconv_cli.train.loop.CHECK_SECONDS", 0)
    config = tiny(**FIVE_STEPS, lookahead_decay=0.95)
    train(config, tmp_path / "straight")
    with pytest.raises(TrainingStopped):
        train(config, tmp_path / "split", progress=stop_at(0, 3))
    assert trainer.resume(tmp_path / "split")["finished"]
    assert same_weights(tmp_path / "straight", tmp_path / "split")
    train(tiny(**FIVE_STEPS, lookahead_decay=0.0), tmp_path / "free")
    assert not same_weights(tmp_path / "straight", tmp_path / "free")  # the lookahead changed the run


def test_a_stop_in_the_very_last_step_finishes_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr("allconv_cli.train.loop.CHECK_EVERY", 1)
    monkeypatch.setattr("allconv_cli.train.loop.CHECK_SECONDS", 0)
    summary = train(tiny(), tmp_path / "run", progress=stop_at(1, 2))
    assert summary["finished"] and summary["epochs_done"] == 2


@pytest.mark.parametrize("seconds, expected", [(0, 4), (3600, 3)], ids=["every-10-steps", "every-hour"])
def test_syncs_with_the_host_are_rare(monkeypatch, seconds, expected):
    """20 steps: the loop reads device values at the epoch's start and end and at its checks: every
    10 steps (2), or where 10 steps take less than CHECK_SECONDS (a GPU), only at the last step."""
    monkeypatch.setattr("allconv_cli.train.loop.CHECK_SECONDS", seconds)
    config = tiny(train_limit=160, batch_size=8, epochs=1)
    setup = trainer.build(config, torch.device("cpu"))
    learner = trainer.make_learner(config, setup.model, setup.preprocess, len(setup.classes), len(setup.train))
    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original):
            reads.append(self.shape)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    trainer.fit(learner, setup.train, trainer.Position(), 1)
    assert len(setup.train) == 20 and len(reads) == expected, reads


def test_fit_takes_the_batches_it_is_given():
    """Synthetic batches, no data set: the loop needs only a Learner and Batches."""
    from allconv_cli.data import splits
    from allconv_cli.data.batches import Batches
    from allconv_cli.data.preprocess import Standardize
    from allconv_cli.models import create_model

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.arange(64) % 4
    batches = Batches(splits.ImageData(images, labels, list("abcd")), 16, shuffle=True, drop_last=True)
    config = tiny(model="all-cnn-a", epochs=3)
    model = create_model("all_cnn_a", num_classes=4, batch_norm=True)
    learner = trainer.make_learner(config, model, Standardize([0.5] * 3, [0.25] * 3), 4, len(batches))
    position = trainer.fit(learner, batches, trainer.Position(), 3)
    assert position.epoch == 3 and [m["epoch"] for m in position.history] == [1, 2, 3]
    assert all(np.isfinite(m["train_loss"]) for m in position.history)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunFolder(run).lock():
        one_line_error(invoke("train", "--preset", "smoke", "--out", run), 2, "in use by allconv train (PID",
                       str(os.getpid()))
    assert not RunFolder(run).holds_run()  # the refused run wrote nothing


def test_two_runs_started_together_into_one_folder(tmp_path):
    run = tmp_path / "run"
    args = [ALLCONV, "train", "--preset", "smoke", "--train-limit", "64", "--test-limit", "32", "--out", str(run)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    loser = outputs[[p.returncode for p in procs].index(2)]
    # the holder's line may not be written yet when the loser reads it: then it names "another process"
    assert ("is in use by" in loser or "holds a run already" in loser) and "Traceback" not in loser
    assert json.loads((run / "config.json").read_text())["train_limit"] == 64
    checkpoint.load_model(run)


def test_a_new_run_never_replaces_one_silently(tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=1), run)
    before = (run / "model.safetensors").read_bytes()
    one_line_error(invoke("train", "--preset", "smoke", "--out", run), 2, "holds a run already", "--resume", "--force")
    assert (run / "model.safetensors").read_bytes() == before
    result = invoke("train", "--preset", "smoke", "--train-limit", "64", "--out", run, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["preset"] == "smoke"


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tmp_path):
    run = tmp_path / "run"
    config = tiny(epochs=1)
    with RunFolder(run).lock() as folder:
        folder.begin(config, replace=False)  # what a run writes before its first epoch ends
    assert trainer.resume(run)["finished"]


def test_stale_temporary_files_are_removed(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, stop_after=1)
    stale = [run / ".model.safetensors.x1y2z3.tmp", run / ".state.pt.abcdef.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    trainer.resume(run)
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("seed, ok", [(2**63 - 1, True), (2**63, False), (-1, False)])
def test_seeds_are_validated_and_step_seeds_never_overflow(tmp_path, seed, ok):
    result = invoke("train", "--preset", "smoke", "--train-limit", "64", "--seed", seed, "--out", tmp_path / "run")
    if ok:
        assert result.exit_code == 0, result.output
    else:
        one_line_error(result, 2, "seed")
    assert 0 <= train_step.step_seed(2**63 - 1, 7, 10**6, 10**9) < 2**63


def test_a_nan_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    original = torch.nn.CrossEntropyLoss.forward
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, x, y: original(self, x, y) * float("nan"))
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1; no checkpoint was written"):
        train(tiny(), tmp_path / "run")
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("payload", [{"config": "{}"}, [1, 2, 3], {"format": 2, "epoch": "one"}])
def test_a_state_of_another_structure_is_one_line(tmp_path, payload):
    run = tmp_path / "run"
    train(tiny(), run, stop_after=1)
    torch.save(payload, run / "state.pt")
    one_line_error(invoke("train", "--resume", run), 2, "not an allconv training state")


def test_resume_with_other_options_is_refused(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, stop_after=1)
    one_line_error(invoke("train", "--resume", run, "--lr", "0.1"), 2, "drop --lr")
    one_line_error(invoke("train", "--resume", run, "--force"), 2, "drop --force")


def test_ablation_recovers_a_run_that_finished_without_a_result(tmp_path):
    out = tmp_path / "ablation"
    args = ["ablate", "--models", "all-cnn-a", "--preset", "smoke", "--train-limit", "64", "--test-limit", "32",
            "--out", out, "--json"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    result = out / "all-cnn-a" / "lr0.05-seed0" / "result.json"
    recorded = json.loads(result.read_text())
    result.unlink()  # as if the process died between training's end and this record
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert json.loads(result.read_text())["test_error"] == recorded["test_error"]


# --- the checkpoint cadence and the preprocessing file -----------------------------------------

SPARSE = {"save_every": 10, "save_minutes": 60.0}  # no checkpoint by the cadence in a tiny run, however slow


def saved_epochs(monkeypatch) -> list[tuple[int, int]]:
    """The (epoch, step) of every checkpoint taken from now on, in order."""
    taken = []
    real = RunFolder.save

    def save(self, learner, position, setup, world):
        taken.append((position.epoch, position.step))
        real(self, learner, position, setup, world)

    monkeypatch.setattr(RunFolder, "save", save)
    return taken


@pytest.fixture(scope="module")
def straight_zca(tmp_path_factory):
    """An uninterrupted run of tiny(preprocess="zca"): a 3072 x 3072 whitening."""
    run = tmp_path_factory.mktemp("straight_zca") / "run"
    train(tiny(preprocess="zca"), run)
    return run


@pytest.fixture(scope="module")
def stopped_zca(tmp_path_factory):
    """tiny(preprocess="zca") stopped after its first epoch, resumable; tests resume copies of it."""
    run = tmp_path_factory.mktemp("stopped_zca") / "run"
    train(tiny(preprocess="zca"), run, stop_after=1)
    return run


RESUMES_FROM = ("config.json", "state.pt", "preprocess.safetensors")  # what a resume reads


def test_a_zca_run_continued_from_a_copy_of_its_small_state_is_bit_exact(tmp_path, straight_zca, stopped_zca):
    """The ZCA matrix is not carried: the copy fits it again from the training images, checks the
    digests and goes on bit for bit as the uninterrupted run did."""
    prep = stopped_zca / "preprocess.safetensors"
    kept = load_file(str(prep))
    assert kept.keys() == {"zca_mean", "zca_diagonal"} and prep.stat().st_size < 32 * 2**10  # the matrix: 36 MiB
    meta, _ = RunFolder(stopped_zca).read_preprocess()
    assert meta["kind"] == "zca" and len(meta["refit"]["data"]) == len(meta["refit"]["fit"]) == 64
    assert torch.load(stopped_zca / "state.pt", weights_only=True)["format"] == 4
    _, weights_meta, tensors = checkpoint.load_weights(stopped_zca)  # the unfinished weights still carry it all
    assert tensors["zca_matrix"].shape == (3072, 3072) and "refit" not in weights_meta["preprocess"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in RESUMES_FROM:
        shutil.copy2(stopped_zca / name, elsewhere / name)
    assert trainer.resume(elsewhere)["finished"]
    assert same_weights(straight_zca, elsewhere)  # the refit matrix included: preprocess.zca_matrix
    refit = load_file(str(elsewhere / "model.safetensors"))
    assert digest(refit["preprocess.zca_mean"], refit["preprocess.zca_matrix"]) == meta["refit"]["fit"]
    assert (elsewhere / "preprocess.safetensors").read_bytes() == prep.read_bytes()  # written once a run


def test_a_resume_on_other_training_images_is_one_line(tmp_path, stopped_zca):
    run = tmp_path / "run"
    shutil.copytree(stopped_zca, run)
    folder = RunFolder(run)
    meta, tensors = folder.read_preprocess()
    folder.write_preprocess({**meta, "refit": {**meta["refit"], "data": "0" * 64}}, tensors)  # fitted on others
    one_line_error(invoke("train", "--resume", run), 2, "training images differ", "resume with the data")
    folder.write_preprocess({**meta, "refit": {"data": 1}}, tensors)
    one_line_error(invoke("train", "--resume", run), 2, "damaged", "--init")


@pytest.mark.parametrize("format_", [2, 3])
def test_a_state_of_an_earlier_format_with_the_preprocessing_stored_still_resumes(tmp_path, straight_zca, stopped_zca,
                                                                                  format_):
    """Format 2 held the ZCA tensors in state.pt, format 3 in preprocess.safetensors: both resume
    from them, and the folder keeps them."""
    run = tmp_path / "run"
    shutil.copytree(stopped_zca, run)
    meta = checkpoint.load_weights(run)[1]["preprocess"]
    tensors = checkpoint.load_weights(run)[2]  # the whole fit, as those formats kept it
    state = torch.load(run / "state.pt", weights_only=True)
    if format_ == 2:
        torch.save({**state, "format": 2, "preprocess_meta": meta, "preprocess_tensors": tensors}, run / "state.pt")
        (run / "preprocess.safetensors").unlink()
    else:
        torch.save({**state, "format": 3}, run / "state.pt")
        RunFolder(run).write_preprocess(meta, tensors)
    assert trainer.resume(run)["finished"] and same_weights(straight_zca, run)
    assert torch.load(run / "state.pt", weights_only=True)["format"] == 4
    assert load_file(str(run / "preprocess.safetensors")).keys() == {"zca_mean", "zca_matrix"}


def test_a_kept_zca_refits_bit_for_bit_and_only_on_its_images():
    """On 8x8 images (192 dims, a fast fit): a refit equals the fit; another image, a changed fit
    or a whitening read from a file (nothing to refit from) is told apart."""
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fitted = preprocessing.fit("zca", images)
    meta, tensors = preprocessing.kept(fitted)
    assert tensors.keys() == {"zca_mean", "zca_diagonal"} and meta["refit"]["data"] == digest(images)
    again = preprocessing.restore(meta, tensors, lambda: images)
    assert torch.equal(again.zca_matrix, fitted.zca_matrix) and torch.equal(again.zca_mean, fitted.zca_mean)
    other = images.clone()
    other[5, 1, 2, 3] ^= 1  # one bit of one pixel
    with pytest.raises(ValueError, match="training images differ"):
        preprocessing.restore(meta, tensors, lambda: other)
    rounded = {**meta, "refit": {**meta["refit"], "fit": "0" * 64}}  # as another machine's first fit rounded
    assert torch.equal(preprocessing.restore(rounded, tensors, lambda: images).zca_matrix, fitted.zca_matrix)
    changed = {**tensors, "zca_diagonal": tensors["zca_diagonal"] * (1 + 1e-3)}
    with pytest.raises(ValueError, match="beyond rounding"):
        preprocessing.restore(rounded, changed, lambda: images)
    read_meta, read_tensors = preprocessing.kept(preprocessing.from_meta(*fitted.to_meta()))  # as from --init
    assert read_meta == fitted.to_meta()[0] and torch.equal(read_tensors["zca_matrix"], fitted.zca_matrix)
    standardize = preprocessing.fit("standardize", images)
    assert preprocessing.kept(standardize) == standardize.to_meta()


def test_a_state_without_its_preprocessing_file_is_one_line(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, stop_after=1)
    (run / "preprocess.safetensors").unlink()
    one_line_error(invoke("train", "--resume", run), 2, "no preprocess.safetensors", "--init")


def test_a_cadence_of_two_epochs_saves_every_two_and_a_crash_between_resumes_bit_exactly(tmp_path, monkeypatch):
    config = tiny(epochs=4, save_every=2, save_minutes=60.0)
    taken = saved_epochs(monkeypatch)
    train(config, tmp_path / "straight")
    assert taken == [(2, 0), (4, 0)]

    def crash_after_epoch_3(event, **fields):
        if event == "epoch" and fields["metrics"]["epoch"] == 3:
            raise RuntimeError("killed")  # as a SIGKILL would: no checkpoint at epoch 3

    with pytest.raises(RuntimeError, match="killed"):
        train(config, tmp_path / "split", progress=crash_after_epoch_3)
    run = tmp_path / "split"
    assert torch.load(run / "state.pt", weights_only=True)["epoch"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # the metrics are written every epoch
    assert trainer.resume(run)["finished"] and same_weights(tmp_path / "straight", run)
    straight_history, split_history = ([json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
                                       for path in (tmp_path / "straight", run))
    assert [m["train_loss"] for m in split_history] == [m["train_loss"] for m in straight_history]


@pytest.mark.parametrize("how", ["signal-at-an-epochs-end", "stop-after"])
def test_a_stop_between_checkpoints_still_checkpoints(tmp_path, monkeypatch, straight, how):
    monkeypatch.setattr("allconv_cli.train.loop.CHECK_EVERY", 1)
    config = tiny(**FIVE_STEPS, **SPARSE)
    taken = saved_epochs(monkeypatch)
    if how == "stop-after":
        assert not train(config, tmp_path / "split", stop_after=1)["finished"]
    else:
        with pytest.raises(TrainingStopped):
            train(config, tmp_path / "split", progress=stop_at(0, 5))  # the first epoch's last step
    assert taken == [(1, 0)]
    assert trainer.resume(tmp_path / "split")["finished"] and taken == [(1, 0), (2, 0)]
    assert same_weights(straight, tmp_path / "split")


def test_the_cadence_may_change_on_resume_and_is_checked(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run, stop_after=1)
    one_line_error(invoke("train", "--resume", run, "--save-every", "0"), 2, "--save-every 0 is not allowed")
    one_line_error(invoke("train", "--resume", run, "--save-minutes", "-1"), 2, "--save-minutes -1.0 is not allowed")
    result = invoke("train", "--resume", run, "--save-every", "1", "--save-minutes", "0.5")
    assert result.exit_code == 0, result.output


# --- full disks and unwritable paths ---------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs of its own, to fill. Needs root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_last_checkpoint_and_says_so_in_one_line(small_disk):
    run = small_disk / "run"
    train(tiny(), run, stop_after=1)  # 5.5 MB of weights, 11 MB of state
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 200_000))  # leave 0.2 MB
    result = invoke("train", "--resume", run)
    one_line_error(result, 2, "cannot write", str(run), "No space left on device")
    assert ".tmp" not in result.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    (small_disk / "filler").unlink()
    assert invoke("train", "--resume", run).exit_code == 0


@pytest.mark.parametrize("fmt", ["safetensors", "onnx", "pt2"])
def test_exports_to_a_full_disk_are_one_line_and_leave_nothing(tmp_path, small_disk, fmt):
    run = tmp_path / "run"
    train(tiny(epochs=1), run)
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 100_000))
    out = small_disk / ("export" if fmt == "safetensors" else f"model.{fmt}")
    result = invoke("export", run, "--format", fmt, "--out", out)
    one_line_error(result, 2, str(out))
    assert ".tmp" not in result.output and sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")],
                         ids=["oserror", "torch.save"])
def test_each_writer_turns_a_failed_write_into_one_line(tmp_path, monkeypatch, error):
    run = tmp_path / "run"
    train(tiny(), run, stop_after=1)
    for target, attribute in ((checkpoint, "save_file"), (torch, "save")):
        def fail(*args, **kwargs):
            raise error

        with monkeypatch.context() as patch:
            patch.setattr(target, attribute, fail)
            result = invoke("train", "--resume", run)
        one_line_error(result, 2, "cannot write", str(run))
        assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_an_out_under_a_file_names_the_path(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    one_line_error(invoke("train", "--preset", "smoke", "--out", tmp_path / "file" / "run"), 2,
                   str(tmp_path / "file" / "run"))


# --- kills at random moments -----------------------------------------------------------------

def _every_file_loads(run: Path):
    if (run / "config.json").exists():
        configuration.from_json((run / "config.json").read_text())
    if (run / "model.safetensors").exists():
        checkpoint.load_weights(run)
    if (run / "state.pt").exists():
        assert isinstance(torch.load(run / "state.pt", weights_only=True), dict)
    if (run / "metrics.jsonl").exists():
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _finished(run: Path, epochs: int) -> bool:
    return (run / "state.pt").exists() and torch.load(run / "state.pt", weights_only=True)["epoch"] == epochs


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_run(tmp_path):
    """12 SIGKILLs at moments drawn with a fixed seed, into start-up, steps and checkpoint writes;
    a run that finishes between kills is checked and the next kill goes to a new one."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(16):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    epochs = 12
    start = [ALLCONV, "train", "--dataset", "imagefolder", "--data-dir", str(root), "--model", "all-cnn-a",
             "--batch-norm", "--batch-size", "8", "--epochs", str(epochs), "--precision", "fp32"]
    moments = random.Random(20).choices([0.5, 1.5, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0], k=12)  # seconds after launch
    runs = [tmp_path / "run0"]
    for moment in moments:
        if _finished(runs[-1], epochs):
            runs.append(tmp_path / f"run{len(runs)}")
        run = runs[-1]
        args = [ALLCONV, "train", "--resume", str(run)] if (run / "config.json").exists() else [*start, "--out", str(run)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(moment)
        proc.kill()
        stderr = proc.communicate()[1]
        assert "Traceback" not in stderr, stderr
        _every_file_loads(run)
    for run in runs:
        if not _finished(run, epochs):  # every kill may have come before the run wrote its config (a slow machine)
            args = [ALLCONV, "train", "--resume", str(run)] if (run / "config.json").exists() else [*start, "--out", str(run)]
            done = subprocess.run([*args, "--json"], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        _every_file_loads(run)
        assert len((run / "metrics.jsonl").read_text().splitlines()) == epochs
        assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# --- distributed -----------------------------------------------------------------------------

def _torchrun(run: Path, *extra, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python", ALLCONV, "train",
            *extra]
    if wait:
        return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _worker(parent: int, rank: int) -> int | None:
    """The PID of torchrun's worker of ``rank``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_ddp_stop_on_one_rank_stops_both_and_resumes_to_the_same_weights(tmp_path):
    settings = ["--preset", "smoke", "--train-limit", "640", "--test-limit", "32", "--batch-size", "16",
                "--epochs", "2", "--device", "cpu", "--precision", "fp32"]
    straight = _torchrun(tmp_path / "straight", *settings, "--out", str(tmp_path / "straight"), "--json")
    assert straight.returncode == 0, straight.stderr[-3000:]
    summary = json.loads(straight.stdout[straight.stdout.index("{"):])  # only rank 0 prints
    assert straight.stdout.count('"finished"') == 1 and summary["finished"]
    metrics = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["images_per_s"] * metrics["seconds"] == pytest.approx(640)  # rank 0 counts both ranks' images

    run = tmp_path / "split"
    proc = _torchrun(run, *settings, "--out", str(run), wait=False)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    # into the second epoch's steps (40 of 8 images per rank, 0.05 s (AMX) or more each), however
    # fast or slow the CPU: a fixed wait from the start raced the end of the run on AMX
    time.sleep(0.5)
    worker = _worker(proc.pid, 1)
    assert worker is not None
    os.kill(worker, signal.SIGTERM)  # rank 1 alone: rank 0 must stop at the same step
    output = proc.communicate(timeout=120)[0]
    assert "allconv train --resume" in output, output[-3000:]
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["world"] == 2 and state["rng_cpu"].shape[0] == 2 and state["epoch"] < 2
    resumed = _torchrun(run, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(tmp_path / "straight", run)
