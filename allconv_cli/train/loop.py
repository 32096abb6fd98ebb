"""The epoch loop: steps, the host syncs (every ``CHECK_EVERY`` steps, at most every
``CHECK_SECONDS`` in one process), evaluation, checkpoints at the run's cadence, stops agreed by
every rank, and the target.

``fit``'s contract: ``evaluate_epoch(epoch)`` adds a split's metrics after an epoch (or returns
{}); ``save`` checkpoints: at the end of the epochs that the config's ``save_every`` /
``save_minutes`` cadence picks, of this call's last epoch and of the epoch reaching the target,
and at a stop; ``record(history)`` is called at the end of each epoch without a checkpoint, so
that the metrics are written every epoch; ``stop`` is the list a signal handler appends to. A
stop is taken at a step boundary that every rank agrees on, and a stop during an epoch's last
step waits for the epoch's end, so no checkpoint sits between an epoch's last step and its
evaluation. ``stop_after`` ends the call after that many epochs. The run ends early after an
evaluated epoch whose top-1 accuracy reaches ``config.target`` (%); every epoch's metrics give
``wall_seconds``, the run's time so far with evaluations (not counting the part of an epoch lost
to a stop).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from allconv_cli.cpu_threads import ThreadWatch
from allconv_cli.data.batches import Batches
from allconv_cli.processes import TIME_LIMIT
from allconv_cli.train.learner import Learner
from allconv_cli.train.step import epoch_flips, flip_plan, train_step

CHECK_EVERY = 10  # steps between the loop's host syncs: finiteness, progress, a stop agreed by all ranks...
# ...and, in one process, at least this many seconds: at about 1 ms a step on a GPU, a sync every
# 10 steps would leave it idle while the host queues the next steps; on a CPU 10 steps take longer
CHECK_SECONDS = 0.5


Progress = Callable[..., None]  # progress(event, **fields); events: start, step, epoch


class TrainingStopped(Exception):
    """A signal stopped the run after a resumable checkpoint; ``signum`` says which. Its args are
    its constructor's, so that it crosses a process boundary (pickling rebuilds it from them)."""

    def __init__(self, signum: int, run_dir: Path | str | None):
        super().__init__(signum, run_dir)
        self.signum, self.run_dir = signum, run_dir

    def __str__(self) -> str:
        cause = "at the time limit" if self.signum == TIME_LIMIT else f"by {signal.Signals(self.signum).name}"
        return f"stopped {cause}; resume with: allconv train --resume {self.run_dir}"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no checkpoint holds that step."""


class ClassReluShut(TrainingDiverged):
    """The paper's ReLU after the class conv was shut on every training image for a whole epoch:
    every class score 0, every gradient 0, so the run can never learn again."""


# How close to ln K an epoch's mean training loss is when every class score was 0 on every image
# (the loss of uniform scores is ln K exactly, with or without label smoothing or mixing; a run
# that learns, even at chance, has scores that differ, and a loss that differs by 1e-3 or more).
SHUT_TOLERANCE = 1e-6
# A run whose last epoch's mean training loss is within this share of ln K has not begun
# to learn: the default recipe on glyphs-100 ends 10 epochs at 4.601 against ln 100 = 4.605 (0.1 %),
# while runs that learn are 5 % or more below ln K by their third epoch (docs/RESULTS.md).
CHANCE_TOLERANCE = 0.01
# Fewer epochs say nothing of learning (a one-epoch smoke run on 256 images takes 4 steps), so
# the note waits for the third epoch, by which runs that learn are below ln K by 5 % or more.
CHANCE_MIN_EPOCHS = 3


@dataclasses.dataclass
class Position:
    """Where a run stands: the next epoch and step, this rank's running sums of the epoch so
    far ((3,) float64 on the device: loss sum, correct, seen) and the metrics of past epochs."""

    epoch: int = 0
    step: int = 0
    sums: torch.Tensor | None = None
    history: list[dict] = dataclasses.field(default_factory=list)


class Cadence:
    """When the loop checkpoints at an epoch's end besides the ends it always saves at (the call's
    last epoch, a stop, the target): once ``every`` epochs or ``minutes`` (wall clock) have passed
    since the last checkpoint, whichever comes first."""

    def __init__(self, every: int, minutes: float, position: Position):
        self.every, self.minutes = every, minutes
        # epochs done in the last checkpoint: the one resumed from, None before a run's first
        self.epoch = position.epoch if position.epoch or position.step else None
        self.since = time.monotonic()

    def due(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` epochs is due a checkpoint by the cadence."""
        return epoch - (self.epoch or 0) >= self.every or time.monotonic() - self.since >= 60 * self.minutes

    def saved(self, epoch: int):
        self.epoch, self.since = epoch, time.monotonic()


def fit(learner: Learner, batches: Batches, position: Position, epochs: int, *,
        evaluate_epoch: Callable[[int], dict] | None = None, save: Callable[[Position], None] | None = None,
        record: Callable[[list[dict]], None] | None = None, progress: Progress | None = None,
        stop: list[int] | None = None, stop_after: int | None = None, world: int = 1,
        run_dir: Path | None = None, threads: ThreadWatch | None = None) -> Position:
    """Train from ``position`` to ``epochs`` on ``batches`` -> the position reached (see above)."""
    progress, save, record = progress or _ignore, save or _ignore, record or _ignore
    loop = _Loop(learner, batches, position, stop if stop is not None else [], world, run_dir, threads)
    end = min(epochs, position.epoch + (stop_after or epochs))  # epochs done when this call ends
    for epoch in range(position.epoch, end):
        lr = loop.train_epoch(epoch, progress, save)  # a stop within the epoch checkpoints and raises
        metrics = loop.end_epoch(epoch, lr, evaluate_epoch)  # its metrics, evaluation and target
        reached = metrics.get("target_reached", False)
        stopping = not reached and position.epoch < epochs and loop.agreed(bool(loop.stop))
        if reached or stopping or position.epoch == end or loop.agreed(loop.cadence.due(position.epoch)):
            save(position)
            loop.cadence.saved(position.epoch)
        else:
            record(position.history)
        progress("epoch", metrics=metrics, epochs=epochs)
        _refuse_a_shut_class_relu(learner.model, metrics, run_dir)
        if reached:
            break
        if stopping:
            raise loop.stopped()
    return position


class _Loop:
    """What ``fit`` keeps between steps and epochs, and its concerns each in one method: an
    epoch's steps, the host check among them, a stop all ranks agree on, an epoch's metrics."""

    def __init__(self, learner: Learner, batches: Batches, position: Position, stop: list[int], world: int,
                 run_dir: Path | None, threads: ThreadWatch | None):
        self.learner, self.batches, self.position, self.stop = learner, batches, position, stop
        self.world, self.run_dir, self.threads = world, run_dir, threads
        self.cadence = Cadence(learner.config.save_every, learner.config.save_minutes, position)
        self.device = next(learner.model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        if position.sums is None:
            position.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        config = learner.config
        self.plan = flip_plan(len(batches.data), config.seed) if config.flips == "alternate" else None
        self.started = time.perf_counter()
        self.wall_before = position.history[-1].get("wall_seconds", 0.0) if position.history else 0.0

    def train_epoch(self, epoch: int, progress: Progress, save: Callable[[Position], None]) -> float:
        """The steps of ``epoch`` from the position's step -> the learning rate of its last step."""
        learner, batches, sums = self.learner, self.batches, self.position.sums
        learner.model.train()
        self.epoch_started, self.seen_before = time.perf_counter(), sums[2].item()  # host sync, once an epoch
        lr = learner.optimizer.param_groups[0]["lr"]
        losses, checked = [], self.epoch_started  # this window's losses, read at the next check; when the last was
        flips = epoch_flips(self.plan, batches, epoch)  # once an epoch: the order is a permutation of the split
        for step, (images, labels) in enumerate(batches.epoch(epoch, self.position.step), start=self.position.step):
            lr = learner.optimizer.param_groups[0]["lr"]  # the rate this step uses, before the schedule moves on
            loss, correct = train_step(learner, images, labels, epoch, step, self.generator, None if flips is None
                                       else flips[step * batches.batch_size:(step + 1) * batches.batch_size])
            _accumulate(sums, loss, correct, len(labels))
            losses.append(loss)
            last = step + 1 == len(batches)
            due = (step + 1) % CHECK_EVERY == 0 and (self.world > 1 or time.perf_counter() - checked >= CHECK_SECONDS)
            if due or last or (self.stop and self.world == 1):
                self.check(losses, epoch, step + 1, lr, progress)
                losses, checked = [], time.perf_counter()
                if not last and self.agreed(bool(self.stop)):
                    self.position.epoch, self.position.step = epoch, step + 1
                    save(self.position)  # a stop always checkpoints, whatever the cadence
                    raise self.stopped()
        return lr

    def check(self, losses: list[torch.Tensor], epoch: int, step: int, lr: float, progress: Progress):
        """The loop's one host sync: the window's losses finite, then progress (ranks check at the same steps)."""
        if self.threads is not None:  # the CPU threads follow the free cores from here (it looks every few seconds)
            self.threads.check()
        seen = _check(losses, self.position.sums, epoch, step, self.cadence.epoch, self.run_dir)
        progress("step", epoch=epoch, step=step, steps=len(self.batches), loss=seen[0] / seen[2],
                 accuracy=100 * seen[1] / seen[2], lr=lr,
                 images_per_s=self.world * (seen[2] - self.seen_before) / (time.perf_counter() - self.epoch_started))

    def end_epoch(self, epoch: int, lr: float, evaluate_epoch: Callable[[int], dict] | None) -> dict:
        """The epoch's metrics (training, evaluation, wall time, the target), added to the history;
        the position moves to the next epoch."""
        config, position = self.learner.config, self.position
        metrics = _epoch_metrics(epoch, position.sums, self.world, time.perf_counter() - self.epoch_started, lr,
                                 config.precision)
        metrics.update(evaluate_epoch(epoch) if evaluate_epoch is not None else {})
        metrics["wall_seconds"] = self.wall_before + time.perf_counter() - self.started
        if target_reached(metrics, config.target):
            metrics["target_reached"] = True
        position.sums.zero_()
        position.history.append(metrics)
        position.epoch, position.step = epoch + 1, 0
        return metrics

    def agreed(self, flag: bool) -> bool:
        return _agreed(flag, self.world, self.device)

    def stopped(self) -> TrainingStopped:
        """The stop to raise: the first signal caught (a rank that caught none stops by agreement)."""
        return TrainingStopped(self.stop[0] if self.stop else signal.SIGTERM, self.run_dir)


def _ignore(*args, **fields):
    """The callback a caller leaves out."""


def _refuse_a_shut_class_relu(model, metrics: dict, run_dir: Path | None):
    """Raise ClassReluShut after an epoch whose training loss says the class ReLU was shut
    throughout (the epoch's metrics are written by then)."""
    classes = getattr(model, "num_classes", 0)
    if not getattr(model, "class_relu", False) or classes < 2:
        return
    if abs(metrics["train_loss"] - math.log(classes)) < SHUT_TOLERANCE * math.log(classes):
        raise ClassReluShut(
            f"the ReLU after the class conv was shut on every training image for all of epoch {metrics['epoch']} "
            f"(train loss {metrics['train_loss']:.4f} = ln {classes}): every class score and gradient is 0, so this "
            f"run cannot learn ({run_dir} keeps its metrics). Try --weight-init xavier-open (class biases that start "
            "the ReLU open), a lower --lr, --batch-norm, or --no-class-relu")


def not_learning(metrics: dict, classes: int, batch_norm: bool) -> str | None:
    """A line for a run whose last epoch's training loss is still that of a uniform guess after
    ``CHANCE_MIN_EPOCHS`` epochs or more, else None;
    what to try depends on whether the network has BatchNorm (the default recipe's) or not."""
    chance = math.log(classes) if classes >= 2 else 0.0
    if not chance or metrics["epoch"] < CHANCE_MIN_EPOCHS:
        return None
    if abs(metrics["train_loss"] - chance) >= CHANCE_TOLERANCE * chance:
        return None
    advice = ("try more --epochs or another --lr" if batch_norm else
              "the paper's network without BatchNorm starts slowly with many classes or few steps, and may not start "
              "at all (docs/RESULTS.md); try more --epochs, or the default recipe (BatchNorm and Muon, deviations "
              "from the paper: leave out --preset faithful or --no-batch-norm)")
    return (f"after {metrics['epoch']} epochs the training loss {metrics['train_loss']:.3f} is still that of a "
            f"uniform guess (ln {classes} = {chance:.3f}): this run has not begun to learn; {advice}")


def target_reached(metrics: dict, target: float | None) -> bool:
    """Whether an epoch's evaluation (validation, else test) reached ``target`` % top-1 accuracy."""
    error = metrics.get("val_top1_error", metrics.get("test_top1_error"))
    return target is not None and error is not None and 100 - error >= target


def finished(history: list[dict], epochs: int) -> bool:
    """Whether a run is over: every epoch done, or its target reached."""
    return len(history) >= epochs or bool(history and history[-1].get("target_reached"))


def _accumulate(sums: torch.Tensor, loss: torch.Tensor, correct: torch.Tensor, images: int):
    """sums (loss sum, correct, seen; float64 on the device) += one step's, in three launches."""
    sums[0].add_(loss, alpha=images)
    sums[1].add_(correct)
    sums[2].add_(images)


def _check(losses: list[torch.Tensor], sums: torch.Tensor, epoch: int, step: int, saved: int | None,
           run_dir: Path | None) -> list[float]:
    """Read the window's losses and the running sums in one transfer; raise on a bad loss, naming
    the epochs the last checkpoint holds (``saved``; None: no checkpoint yet)."""
    values = torch.cat([sums, torch.stack(losses).double()]).tolist()
    window = values[3:]
    bad = next((i for i, v in enumerate(window) if not np.isfinite(v)), None)
    if bad is not None:
        kept = (f"{run_dir} keeps the last good checkpoint (epoch {saved})" if saved is not None
                else "no checkpoint was written")
        raise TrainingDiverged(f"the loss became {window[bad]} at epoch {epoch + 1}, step "
                               f"{step - len(window) + bad + 1}; {kept}. Lower --lr, or add --batch-norm")
    return values[:3]


def _agreed(flag: bool, world: int, device: torch.device) -> bool:
    """Whether any rank raised ``flag``: all ranks get the same answer, so all stop together."""
    if world == 1:
        return flag
    vote = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX)
    return bool(vote.item())


def _epoch_metrics(epoch, sums, world, seconds, lr: float, precision: str) -> dict:
    if world > 1:
        torch.distributed.all_reduce(sums)
    loss, correct, seen = sums.tolist()
    return {"epoch": epoch + 1, "train_loss": loss / seen, "train_accuracy": 100 * correct / seen,
            "lr": lr, "seconds": seconds, "images_per_s": seen / seconds, "precision": precision}
