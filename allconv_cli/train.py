"""The trainer shared by train, ablate and benchmark: one run folder, one step, one loop.

- ``RunFolder`` alone reads and writes a run folder: ``config.json`` (the resolved settings),
  ``model.safetensors`` (weights and what rebuilds the model and its preprocessing),
  ``state.pt`` (optimizer, scheduler, EMA, every rank's RNG, position; plain tensors and
  numbers, read with ``torch.load(weights_only=True)`` and validated), ``metrics.jsonl`` (one
  JSON object per epoch), ``curves.png`` and ``.lock`` (held for the whole run).
- ``train_step`` is the one training step (augmentation, preprocessing, autocast forward,
  loss, backward, optimizer, schedule, EMA), timed as it is by ``allconv benchmark``.
- ``fit`` runs epochs of the batches it is given; ``train`` is the orchestrator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from allconv_cli import checkpoint, datasets, preprocess as preprocessing
from allconv_cli.config import TrainConfig, from_json
from allconv_cli.device import autocast, resolve_device, resolve_precision, tune_cpu_allocator
from allconv_cli.evaluation import evaluate, paper_error
from allconv_cli.images import fit_options
from allconv_cli.initialization import WHITEN_IMAGES, dirac, initialize, whiten_first_conv
from allconv_cli.models import create_model, default_config, resolve_name

CONFIG_NAME, STATE_NAME, METRICS_NAME, CURVES_NAME, LOCK_NAME = (
    "config.json", "state.pt", "metrics.jsonl", "curves.png", ".lock")
RUN_FILES = (CONFIG_NAME, STATE_NAME, checkpoint.WEIGHTS_NAME, METRICS_NAME, CURVES_NAME)
STATE_FORMAT = 2
RESUME_MAY_CHANGE = ("device", "workers")  # settings that do not change what is computed
LSUV_IMAGES = 64  # training images the lsuv initialization measures variances on
CHECK_EVERY = 10  # steps between the loop's host syncs: finiteness, progress, a stop agreed by all ranks

Progress = Callable[..., None]  # progress(event, **fields); events: start, step, epoch


class TrainingStopped(Exception):
    """A signal stopped the run after a resumable checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, run_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume with: allconv train --resume {run_dir}")
        self.signum = signum


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no checkpoint holds that step."""


# --- data and model -------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """What a run trains on, built from its config: model, preprocessing and batches."""

    model: nn.Module
    preprocess: nn.Module
    classes: list[str]
    input_size: tuple[int, int, int]
    train: datasets.Batches
    evaluate: datasets.Batches
    test: datasets.Batches | None  # only when evaluate is a validation split


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def build(config: TrainConfig, device: torch.device, rank: int = 0, world: int = 1,
          preprocess_state: tuple[dict, dict] | None = None) -> Setup:
    """Load the data, fit (or restore) the preprocessing, and build the model on ``device``."""
    name = resolve_name(config.model)
    registered = default_config(name)
    input_size, fit = tuple(registered["input_size"]), fit_options(registered)
    if config.crop >= min(input_size[1:]):
        raise ValueError(f"crop {config.crop} px is not smaller than {name}'s {input_size[1]}x{input_size[2]} "
                         f"input: give a smaller --crop")
    train = datasets.load_split(config.dataset, "train", config.data_dir, input_size, config.workers, fit)
    train = datasets.limit(train, config.train_limit, config.seed)
    test = datasets.limit(datasets.load_split(config.dataset, "test", config.data_dir, input_size, config.workers,
                                              fit), config.test_limit, config.seed)
    if len(test.classes) != len(train.classes):
        raise ValueError(f"the train split has {len(train.classes)} classes and the test split "
                         f"{len(test.classes)}: give both the same class folders")
    validation = None
    if config.val_fraction > 0:
        train, validation = datasets.held_out(train, config.val_fraction, config.seed)
    if config.shuffle_labels:  # once, fixed by the seed: the labels no longer say what the image shows
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
        train = dataclasses.replace(train, labels=train.labels[order])
    model = create_model(name, **model_kwargs(config, len(train.classes)))
    for norm in model.modules():  # a training setting, not the model's: set on every build, resumes included
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.momentum = config.bn_momentum
    if config.init is not None and preprocess_state is None:  # a resumed run restores its own state
        state, meta, tensors = checkpoint.load_weights(config.init)
        checkpoint.load_state(model, state, f"--init {config.init} holds {meta['model']} with "
                                            f"{meta.get('model_kwargs')}, which does not fit {name} with these settings")
        if meta["preprocess"]["kind"] != config.preprocess:
            raise ValueError(f"--init {config.init} was trained on {meta['preprocess']['kind']} inputs: "
                             f"give --preprocess {meta['preprocess']['kind']}")
        preprocess_state = (meta["preprocess"], tensors)  # the inputs its weights were learned for
    if preprocess_state is not None:  # resumed, or started from --init weights: no fresh init
        prep = preprocessing.from_meta(*preprocess_state)
    else:
        images = _fit_images(train, config.seed)
        prep = preprocessing.fit(config.preprocess, images)
        shuffled = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))]
        initialize(model, config.weight_init, prep(shuffled[:LSUV_IMAGES].float() / 255))
        if config.whiten != "off":
            whiten_first_conv(model, prep(shuffled[:WHITEN_IMAGES].float() / 255))
        if config.dirac:
            dirac(model)
    if config.whiten == "frozen":  # on resume too: the rebuilt model must not train it either
        first_conv(model).requires_grad_(False)
    model = model.to(device, memory_format=_memory_format(config))
    per_rank = max(1, config.batch_size // world)

    def batches(split, shuffle):
        return datasets.Batches(split, per_rank, shuffle=shuffle, drop_last=shuffle, seed=config.seed,
                                rank=rank, world=world, device=device, workers=config.workers)

    evaluate_on = validation if validation is not None else test
    return Setup(model, prep.to(device), train.classes, input_size, batches(train, True),
                 batches(evaluate_on, False), batches(test, False) if validation is not None else None)


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _fit_images(split: datasets.Split, seed: int, most: int = 10_000) -> torch.Tensor:
    """All training images in memory; a fixed random 10,000 of a streamed folder."""
    if isinstance(split, datasets.ImageData):
        return split.images
    sample = datasets.limit(split, most, seed)
    return torch.cat([x for x, _ in datasets.Batches(sample, 256, shuffle=False).epoch(0)])


def _memory_format(config: TrainConfig):
    return torch.channels_last if config.channels_last else torch.contiguous_format


def model_kwargs(config: TrainConfig, num_classes: int) -> dict:
    """The model's options; a dropout left at None keeps the model's own (the paper's) rate."""
    dropout = {k: getattr(config, k) for k in ("drop_input", "drop_rate") if getattr(config, k) is not None}
    return {"num_classes": num_classes, "batch_norm": config.batch_norm, "class_relu": config.class_relu, **dropout}


# --- optimizer, schedule, the step ----------------------------------------------------------

def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with the run's momentum, Nesterov and weight decay (Section 3.2's optimizer). With
    ``decay_all`` off, biases and BatchNorm parameters (every parameter of fewer than 2
    dimensions) are not decayed. Biases (BatchNorm shifts, conv biases) learn at
    ``lr * bias_lr_scale``; where they are decayed, their decay is divided by the same factor,
    so that the decay per step (lr x weight decay) stays the weights' (airbench's bias scaling).
    With ``optimizer = "muon"`` the conv weights take ``Muon``'s steps at ``muon_lr`` instead.

    One group per distinct (lr, decay, optimizer), parameters in the model's order, the weights first (the
    group whose rate the log reports): with a scale of 1 the groups are those of runs saved
    before the scale existed, so their optimizer states still load. A frozen parameter is left out."""
    groups: dict[tuple[float, bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr_scale = config.bias_lr_scale if param.ndim <= 1 and name.endswith("bias") else 1.0
            muon = config.optimizer == "muon" and param.ndim > 1
            groups.setdefault((lr_scale, param.ndim > 1 or config.decay_all, muon), []).append(param)
    # the weights' group first even where the first conv is frozen and a BatchNorm comes first
    ordered = sorted(groups.items(), key=lambda group: not any(p.ndim > 1 for p in group[1]))
    param_groups = [{"params": params, "lr": config.lr * lr_scale,
                     "weight_decay": config.weight_decay / lr_scale if decayed else 0.0}
                    for (lr_scale, decayed, _), params in ordered]
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    # the weights' group (first): Muon's step, with no SGD momentum or decay of its own
    param_groups[0].update(lr=config.muon_lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                           muon_momentum=config.muon_momentum)
    # bf16 where the run computes in it (natively), else fp32: with oneDNN held to AVX2, bf16
    # matmuls took 890 ms a step here against fp32's 26 ms (AMX: bf16 15 ms)
    fp32 = resolve_precision(config.precision, next(model.parameters()).device) == "fp32"
    return Muon(param_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                dtype=torch.float32 if fp32 else torch.bfloat16)


def orthogonalize(matrix: torch.Tensor, dtype: torch.dtype = torch.bfloat16, steps: int = 5) -> torch.Tensor:
    """(m, n) -> (m, n) of the same row and column spaces with every singular value near 1
    (between about 0.7 and 1.2): Keller Jordan's quintic Newton-Schulz iteration, computed in
    ``dtype``, whose coefficients push small singular values up fast rather than converge exactly."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the (short, long) orientation: the Gram matrix is short x short
    x = x / (x.norm() + 1e-7)  # Frobenius norm 1 bounds every singular value by 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class Muon(torch.optim.SGD):
    """torch's SGD, where groups holding ``muon_momentum`` take Muon's step instead (Keller Jordan;
    airbench's conv filters): Nesterov momentum of the gradients, orthogonalized as an
    (out, in x kh x kw) matrix so that every direction in the filter bank moves alike.

    Before each step a bank is rescaled to Frobenius norm sqrt(out), which changes nothing the
    net computes because a BatchNorm follows every conv (``validate`` demands it); the update is
    scaled to about that norm too, so ``lr`` is the share of a bank's norm one step moves,
    independent of its shape, and no weight decay is needed to hold the norm. ``dtype`` is the
    orthogonalization's: a property of the machine, not of the run, so not in the state."""

    def __init__(self, params, dtype: torch.dtype = torch.bfloat16, **sgd):
        super().__init__(params, **sgd)
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if "muon_momentum" not in group:
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "muon_buffer" not in state:
                    state["muon_buffer"] = torch.zeros_like(param.grad)
                buffer = state["muon_buffer"].mul_(group["muon_momentum"]).add_(param.grad)
                direction = param.grad.add(buffer, alpha=group["muon_momentum"])  # Nesterov
                param.mul_(param.shape[0] ** 0.5 / param.norm().clamp(min=1e-12))  # all-zero stays zero
                update = orthogonalize(direction.flatten(1), self.dtype)  # (out, in x kh x kw)
                # Frobenius norm about sqrt(min(out, in x kh x kw)): scaled to sqrt(out) for banks of few inputs
                # (conv1's 96 x 27); SGD without momentum or decay in this group steps by exactly -lr x it
                param.grad = update.mul_(max(1.0, update.shape[0] / update.shape[1]) ** 0.5).view_as(param)
        return super().step(closure)


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    """A per-step learning-rate schedule from torch's schedulers: a linear warm-up from lr / 10
    over ``warmup_epochs`` (none where that rounds to no step), then the schedule's main part.
    ``onecycle`` is that warm-up and a linear decay to lr / 1000 at the run's last step, for any
    number of steps (torch's OneCycleLR divides by zero with a warm-up of under two)."""
    sched = torch.optim.lr_scheduler
    total = config.epochs * steps_per_epoch
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "onecycle":
        main = sched.LinearLR(optimizer, start_factor=1.0, end_factor=1e-3, total_iters=max(1, total - 1 - warmup))
    elif config.schedule == "paper":
        main = sched.MultiStepLR(optimizer, [m * steps_per_epoch - warmup for m in config.milestones],
                                 gamma=config.gamma)
    elif config.schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


@dataclasses.dataclass
class Learner:
    """Everything one training step touches. ``model`` holds the fp32 weights; ``step_model``
    runs the step (the model, or its DDP / compiled wrapper)."""

    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: nn.Module | None  # timm's ModelEmaV3: evaluated and saved instead of the raw weights
    lookahead: "Lookahead | None"  # airbench's lookahead; its slow copy is saved in state.pt
    scaler: torch.amp.GradScaler | None  # fp16 only
    criterion: nn.Module
    mixup: Callable | None  # timm's Mixup for augment = "strong"
    preprocess: nn.Module
    config: TrainConfig  # precision resolved
    rank: int = 0

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


def make_learner(config: TrainConfig, model: nn.Module, preprocess: nn.Module, num_classes: int,
                 steps_per_epoch: int, rank: int = 0, world: int = 1) -> Learner:
    """The optimizer, schedule, EMA, loss and wrappers of a run around ``model`` (on its device)."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config)
    ema = None
    if config.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay)
    lookahead = (Lookahead(model, config.lookahead_decay, steps_per_epoch, config.epochs * steps_per_epoch)
                 if config.lookahead_decay > 0 else None)
    step_model = model
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        step_model = torch.compile(step_model)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    mixup, criterion = _loss(config, num_classes)
    return Learner(model, step_model, optimizer, make_scheduler(optimizer, config, steps_per_epoch), ema, lookahead, scaler,
                   criterion, mixup, preprocess, config, rank)


class Lookahead:
    """airbench's lookahead (from hlb-cifar10): a slow copy of the model's floating-point state
    (weights, BatchNorm statistics). Every ``EVERY`` steps, and at the run's last, the copy moves
    toward the trained state by 1 - rho and training goes on from the copy. rho = decay^EVERY x
    progress^3 rises from 0: early steps run free, the last ones are averaged."""

    EVERY = 5

    def __init__(self, model: nn.Module, decay: float, steps_per_epoch: int, total_steps: int):
        self.decay, self.steps_per_epoch, self.total_steps = decay, steps_per_epoch, total_steps
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int, step: int):
        done = epoch * self.steps_per_epoch + step + 1  # steps taken in the run
        if done % self.EVERY and done != self.total_steps:
            return
        rho = self.decay ** self.EVERY * (done / self.total_steps) ** 3
        trained = model.state_dict()  # shares storage with the model: copying into it moves the model
        for name, slow in self.slow.items():
            slow.lerp_(trained[name], 1 - rho)
            trained[name].copy_(slow)

    def state_dict(self) -> dict:
        return self.slow

    def load_state_dict(self, state: dict):
        for name, slow in self.slow.items():
            slow.copy_(state[name])


def _loss(config: TrainConfig, num_classes: int):
    """(mixup or None, criterion): CutMix/Mixup with soft targets for ``strong`` augmentation."""
    if config.augment == "strong":
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=config.label_smoothing,
                      num_classes=num_classes, mode="batch")
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """Augmentation seed of one step, so that any step replays after a resume; below 2^63 for
    every valid seed (torch's generators take at most 64 bits)."""
    return (((seed * 1_000_003 + rank) * 10_007 + epoch) * 1_000_003 + step) % 2**63


def flip_plan(count: int, seed: int) -> torch.Tensor:
    """(count,) bool: which images are mirrored in even epochs with ``flips = "alternate"``; odd
    epochs mirror the others, so every image is seen both ways every two epochs."""
    return torch.rand(count, generator=torch.Generator().manual_seed(seed)) < 0.5


def epoch_flips(plan: torch.Tensor | None, batches: datasets.Batches, epoch: int) -> torch.Tensor | None:
    """The mirroring of this rank's images in ``epoch``, in batch order, under ``plan`` (None:
    random flips); step k's images are entries k * batch_size onwards."""
    if plan is None:
        return None
    return plan[batches.order(epoch)] ^ bool(epoch % 2)


def batch_inputs(config: TrainConfig, preprocess: nn.Module, images: torch.Tensor, epoch: int, step: int,
                 generator: torch.Generator, rank: int = 0, flips: torch.Tensor | None = None) -> torch.Tensor:
    """The data path of a step: uint8 (B, C, H, W) -> augmented (seeded by the step; ``flips``,
    (B,) bool, chooses the mirrored images instead of chance), scaled to [0, 1], preprocessed
    float input in the run's memory format."""
    generator.manual_seed(step_seed(config.seed, rank, epoch, step))
    x = datasets.augment(images, config.augment, generator, config.shift,
                         size=config.crop if epoch < config.crop_epochs else None,
                         flips=None if flips is None else flips.to(images.device))
    return preprocess(x.float() / 255).contiguous(memory_format=_memory_format(config))


def train_step(learner: Learner, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int,
               generator: torch.Generator, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on a uint8 (B, C, H, W) batch -> (loss, correct count), both still on the device:
    reading them is left to the caller, so the step itself never waits for the device."""
    config = learner.config
    x = batch_inputs(config, learner.preprocess, images, epoch, step, generator, learner.rank, flips)
    target = labels
    if learner.mixup is not None:
        np.random.seed(step_seed(config.seed, learner.rank, epoch, step) % 2**32)  # timm's Mixup uses numpy's
        x, target = learner.mixup(x, labels)
    with autocast(x.device, config.precision):
        logits = learner.step_model(x)
    loss = learner.criterion(logits.float(), target)  # the loss in fp32
    learner.optimizer.zero_grad(set_to_none=True)
    if learner.scaler is not None:
        learner.scaler.scale(loss).backward()
        learner.scaler.step(learner.optimizer)  # host sync: the scaler reads whether gradients overflowed
        learner.scaler.update()
    else:
        loss.backward()
        learner.optimizer.step()
    learner.scheduler.step()
    if learner.lookahead is not None:
        learner.lookahead.update(learner.model, epoch, step)
    if learner.ema is not None:
        learner.ema.update(learner.model)
    return loss.detach(), (logits.detach().argmax(1) == labels).sum()


# --- the run folder -------------------------------------------------------------------------

@dataclasses.dataclass
class Position:
    """Where a run stands: the next epoch and step, this rank's running sums of the epoch so
    far ((3,) float64 on the device: loss sum, correct, seen) and the metrics of past epochs."""

    epoch: int = 0
    step: int = 0
    sums: torch.Tensor | None = None
    history: list[dict] = dataclasses.field(default_factory=list)


# state.pt's entries and their types: what a valid file holds, checked on every load
_STATE_TYPES = {
    "format": int, "config": str, "epoch": int, "step": int, "sums": torch.Tensor, "history": str,
    "model": dict, "optimizer": dict, "scheduler": dict, "ema": (dict, type(None)), "world": int,
    "lookahead": (dict, type(None)),
    "rng_cpu": torch.Tensor, "rng_cuda": (torch.Tensor, type(None)),
    "preprocess_meta": dict, "preprocess_tensors": dict,
}


class RunFolder:
    """The one reader and writer of a run folder. Only rank 0 writes; every write is atomic, and
    ``state.pt`` is written last, so a kill at any instant leaves a consistent, resumable run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    @contextlib.contextmanager
    def lock(self):
        """Hold ``.lock`` for the run; another process gets one line naming the holder. The
        kernel releases the lock when the holder dies, so a killed run leaves none behind."""
        import fcntl

        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the run folder {self.path}: {err.strerror}; "
                                     "give --out a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1024).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"{self.path} is in use by {holder}: wait for that run to end or stop it, "
                             "or give another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"allconv train (PID {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
            for stale in self.path.glob(".*.tmp"):  # left by writers killed mid-write; we hold the lock
                stale.unlink(missing_ok=True)
            yield self
        finally:
            os.ftruncate(fd, 0)
            if created and not self.holds_run():  # a run that failed to start leaves no folder behind
                (self.path / LOCK_NAME).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            os.close(fd)

    def refuse_a_run(self, replace: bool):
        """A new run may start here: the folder holds no run, or ``replace`` says to replace it."""
        if self.holds_run() and not replace:
            raise ValueError(f"{self.path} holds a run already: continue it with allconv train --resume "
                             f"{self.path}, give another --out, or replace it with --force")

    def begin(self, config: TrainConfig, replace: bool):
        """Start a new run here: refuse a folder that holds one unless ``replace``."""
        self.refuse_a_run(replace)
        if self.holds_run():
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        checkpoint.atomic_write_text(self.path / CONFIG_NAME, config.to_json())

    def read_config(self) -> TrainConfig:
        path = self.path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run folder (no {CONFIG_NAME}): give the folder "
                                    "that allconv train wrote")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not an allconv run configuration (not UTF-8 text): give the folder "
                             "that allconv train wrote") from None
        return from_json(text, str(path))

    def read_state(self, config: TrainConfig) -> dict | None:
        """``state.pt``, checked for structure and for the settings it was started with; None
        for a run that was stopped before its first checkpoint (it starts again from scratch)."""
        path = self.path / STATE_NAME
        if not path.is_file():
            if not (self.path / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"{self.path} has no {STATE_NAME} to resume from: give the folder of "
                                        "a run that allconv train started")
            _check_same(json.loads(self.read_config().to_json()), config, self.path)
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: torch raises several kinds
            raise ValueError(f"{path} cannot be read ({type(err).__name__}); it is not an allconv training "
                             "state, or it is damaged") from None
        bad = ([k for k, kind in _STATE_TYPES.items() if not isinstance(state.get(k), kind)]
               if isinstance(state, dict) else ["its structure"])
        if bad or state["format"] != STATE_FORMAT or state["sums"].shape != (3,):
            raise ValueError(f"{path} is not an allconv training state of format {STATE_FORMAT} "
                             f"({', '.join(bad) or 'format or sums'} wrong; an older allconv's state cannot be "
                             f"resumed): continue from its weights with --init {self.path}, or start a new run")
        _check_same(json.loads(state["config"]), config, self.path)
        return state

    def restore(self, learner: Learner, state: dict, rank: int, world: int) -> Position:
        """Load ``state`` into ``learner`` -> the position to continue from."""
        if len(state["rng_cpu"]) != world:
            raise ValueError(f"{self.path} was trained by {len(state['rng_cpu'])} processes: resume it with "
                             "as many")
        try:
            learner.model.load_state_dict(state["model"])
            learner.optimizer.load_state_dict(state["optimizer"])
            learner.scheduler.load_state_dict(state["scheduler"])
            if learner.ema is not None:
                learner.ema.load_state_dict(state["ema"])
            if learner.lookahead is not None:
                learner.lookahead.load_state_dict(state["lookahead"])
            torch.set_rng_state(state["rng_cpu"][rank].clone())  # a row of its own: torch reads from offset 0
            history = json.loads(state["history"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{self.path / STATE_NAME} does not fit this run's model and optimizer "
                             f"({type(err).__name__}): start a new run") from None
        device = next(learner.model.parameters()).device
        if device.type == "cuda" and state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"][rank].clone(), device)
        sums = state["sums"].to(device) if rank == 0 else torch.zeros(3, dtype=torch.float64, device=device)
        return Position(state["epoch"], state["step"], sums, history)

    def save(self, learner: Learner, position: Position, setup: Setup, world: int):
        """Weights, metrics and chart, then the state: on every rank (they take part in gathering
        the metric sums and RNG states); rank 0 writes."""
        device = position.sums.device
        sums = position.sums.clone()
        rng_cpu, rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        if world > 1:  # rank 0 saves the sums of all ranks and every rank's generator
            torch.distributed.all_reduce(sums)
            rng_cpu = _gather(rng_cpu, device, world)
            rng_cuda = None if rng_cuda is None else _gather(rng_cuda, device, world)
        else:
            rng_cpu, rng_cuda = rng_cpu[None], None if rng_cuda is None else rng_cuda[None]
        if learner.rank != 0:
            return
        config = learner.config
        prep_meta, prep_tensors = setup.preprocess.to_meta()
        meta = {"model": resolve_name(config.model), "model_kwargs": model_kwargs(config, len(setup.classes)),
                "classes": setup.classes, "input_size": list(setup.input_size), "preprocess": prep_meta,
                "dataset": config.dataset, "data_dir": config.data_dir, "augment": config.augment,
                "precision": config.precision, "epoch": position.epoch,
                "metrics": position.history[-1] if position.history else {},
                "paper_error": paper_error(config.model, config.dataset, setup.classes, config.augment)}
        checkpoint.save_weights(self.path / checkpoint.WEIGHTS_NAME, learner.eval_model, meta, preprocess=prep_tensors)
        if position.history:
            self.write_metrics(position.history)
        payload = {
            "format": STATE_FORMAT, "config": config.to_json(), "epoch": position.epoch, "step": position.step,
            "sums": sums.cpu(), "history": json.dumps(position.history), "world": world,
            "model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
            "ema": learner.ema.state_dict() if learner.ema is not None else None,
            "lookahead": learner.lookahead.state_dict() if learner.lookahead is not None else None,
            "rng_cpu": rng_cpu.cpu(), "rng_cuda": None if rng_cuda is None else rng_cuda.cpu(),
            "preprocess_meta": prep_meta, "preprocess_tensors": prep_tensors,
        }
        checkpoint.atomic_write(self.path / STATE_NAME, lambda tmp: torch.save(payload, tmp))

    def write_metrics(self, history: list[dict]):
        from allconv_cli.charts import learning_curves

        checkpoint.atomic_write_text(self.path / METRICS_NAME, "".join(json.dumps(m) + "\n" for m in history))
        learning_curves(history, self.path / CURVES_NAME)


def _check_same(saved: dict, config: TrainConfig, run_dir: Path):
    given = json.loads(config.to_json())
    saved = {**json.loads(TrainConfig().to_json()), **saved}  # a setting added since the run began: its default
    changed = sorted(k for k in given if k not in RESUME_MAY_CHANGE and saved.get(k) != given[k])
    if changed:
        raise ValueError(f"{run_dir} was started with other settings ({', '.join(changed)}); resume it "
                         "with its own (allconv train --resume RUN) or start a new run")


def _gather(tensor: torch.Tensor, device: torch.device, world: int) -> torch.Tensor:
    """Every rank's copy of a same-shaped tensor -> (world, ...) on every rank."""
    local = tensor.to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local)
    return torch.stack(parts)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    return RunFolder(run_dir).read_config()


# --- the loop -------------------------------------------------------------------------------

def fit(learner: Learner, batches: datasets.Batches, position: Position, epochs: int, *,
        evaluate_epoch: Callable[[int], dict] | None = None, save: Callable[[Position], None] | None = None,
        progress: Progress | None = None, stop: list[int] | None = None, stop_after: int | None = None,
        world: int = 1, run_dir: Path | None = None) -> Position:
    """Train from ``position`` to ``epochs`` on ``batches`` -> the position reached.

    ``evaluate_epoch(epoch)`` adds a split's metrics after an epoch (or returns {}); ``save``
    checkpoints (at the end of every epoch, and at a stop); ``stop`` is the list a signal handler
    appends to. A stop is taken at a step boundary that every rank agrees on, and a stop during an
    epoch's last step waits for the epoch's end, so no checkpoint sits between an epoch's last
    step and its evaluation. ``stop_after`` ends the call after that many epochs. The run ends
    early after an evaluated epoch whose top-1 accuracy reaches ``config.target`` (%); every
    epoch's metrics give ``wall_seconds``, the run's time so far with evaluations (not counting
    the part of an epoch lost to a stop).
    """
    progress = progress or (lambda event, **fields: None)
    save = save or (lambda position: None)
    stop = stop if stop is not None else []
    device = next(learner.model.parameters()).device
    generator = torch.Generator(device=device)
    if position.sums is None:
        position.sums = torch.zeros(3, dtype=torch.float64, device=device)
    sums, steps = position.sums, len(batches)
    plan = flip_plan(len(batches.data), learner.config.seed) if learner.config.flips == "alternate" else None
    fit_started = time.perf_counter()
    wall_before = position.history[-1].get("wall_seconds", 0.0) if position.history else 0.0
    for epoch in range(position.epoch, min(epochs, position.epoch + (stop_after or epochs))):
        learner.model.train()
        started, seen_before = time.perf_counter(), sums[2].item()  # host sync, once an epoch
        lr = learner.optimizer.param_groups[0]["lr"]
        losses = []  # this window's losses, read at the next check
        flips = epoch_flips(plan, batches, epoch)  # once an epoch: the order is a permutation of the split
        for step, (images, labels) in enumerate(batches.epoch(epoch, position.step), start=position.step):
            lr = learner.optimizer.param_groups[0]["lr"]  # the rate this step uses, before the schedule moves on
            loss, correct = train_step(learner, images, labels, epoch, step, generator, None if flips is None
                                       else flips[step * batches.batch_size:(step + 1) * batches.batch_size])
            sums += torch.stack([loss.double() * len(labels), correct.double(),
                                 torch.full((), float(len(labels)), dtype=torch.float64, device=device)])
            losses.append(loss)
            last = step + 1 == steps
            if (step + 1) % CHECK_EVERY == 0 or last or (stop and world == 1):
                # The loop's one host sync, every CHECK_EVERY steps: losses finite, progress, stop.
                seen = _check(losses, sums, epoch, step + 1, position.history, run_dir)
                losses = []
                progress("step", epoch=epoch, step=step + 1, steps=steps, loss=seen[0] / seen[2],
                         accuracy=100 * seen[1] / seen[2], lr=lr,
                         images_per_s=world * (seen[2] - seen_before) / (time.perf_counter() - started))
                if not last and _agreed(bool(stop), world, device):
                    position.epoch, position.step = epoch, step + 1
                    save(position)
                    raise TrainingStopped(stop[0] if stop else signal.SIGTERM, run_dir)
        metrics = _epoch_metrics(epoch, sums, world, time.perf_counter() - started, lr, learner.config.precision)
        metrics.update(evaluate_epoch(epoch) if evaluate_epoch is not None else {})
        metrics["wall_seconds"] = wall_before + time.perf_counter() - fit_started
        reached = target_reached(metrics, learner.config.target)
        if reached:
            metrics["target_reached"] = True
        sums.zero_()
        position.history.append(metrics)
        position.epoch, position.step = epoch + 1, 0
        save(position)
        progress("epoch", metrics=metrics, epochs=epochs)
        if reached:
            break
        if position.epoch < epochs and _agreed(bool(stop), world, device):
            raise TrainingStopped(stop[0] if stop else signal.SIGTERM, run_dir)
    return position


def target_reached(metrics: dict, target: float | None) -> bool:
    """Whether an epoch's evaluation (validation, else test) reached ``target`` % top-1 accuracy."""
    error = metrics.get("val_top1_error", metrics.get("test_top1_error"))
    return target is not None and error is not None and 100 - error >= target


def finished(history: list[dict], epochs: int) -> bool:
    """Whether a run is over: every epoch done, or its target reached."""
    return len(history) >= epochs or bool(history and history[-1].get("target_reached"))


def _check(losses: list[torch.Tensor], sums: torch.Tensor, epoch: int, step: int, history: list,
           run_dir: Path | None) -> list[float]:
    """Read the window's losses and the running sums in one transfer; raise on a bad loss."""
    values = torch.cat([sums, torch.stack(losses).double()]).tolist()
    window = values[3:]
    bad = next((i for i, v in enumerate(window) if not np.isfinite(v)), None)
    if bad is not None:
        kept = (f"{run_dir} keeps the last good checkpoint (epoch {len(history)})" if history
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


def train(config: TrainConfig, run_dir: str | Path, progress: Progress | None = None, resume: bool = False,
          stop_after: int | None = None, replace: bool = False, finished_ok: bool = False) -> dict:
    """Train ``config`` into ``run_dir`` (or continue it there with ``resume``) -> summary.

    A new run refuses a folder holding one unless ``replace``. ``stop_after`` ends this call,
    resumably, after that many epochs. SIGINT / SIGTERM write a resumable checkpoint and raise
    TrainingStopped. ``finished_ok`` lets ``resume`` of a finished run just summarize it.
    """
    run = RunFolder(run_dir)
    rank, world, local_rank = _distributed()
    progress = progress if progress is not None and rank == 0 else None
    device = _start(config, world, local_rank)
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
    try:
        with run.lock() if rank == 0 else contextlib.nullcontext():
            state = run.read_state(config) if resume else None
            if state is not None and finished(json.loads(state["history"]), config.epochs) and not finished_ok:
                raise ValueError(f"{run.path} already finished (all {config.epochs} epochs, or its --target); "
                                 "nothing to resume (start a new run, e.g. with --epochs)")
            if state is None and rank == 0:
                run.refuse_a_run(replace or resume)  # before loading data, which can take minutes
            _seed(config, rank)
            setup = build(config, device, rank, world, (state["preprocess_meta"], state["preprocess_tensors"])
                          if state else None)
            if state is None and rank == 0:  # after build: a run whose data fails to load writes nothing
                run.begin(config, replace or resume)  # a resume without state.pt restarts from scratch
            learner = make_learner(config, setup.model, setup.preprocess, len(setup.classes), len(setup.train),
                                   rank, world)
            position = run.restore(learner, state, rank, world) if state else Position()
            if progress is not None:
                progress("start", config=config, run_dir=run.path, classes=setup.classes, steps=len(setup.train),
                         start_epoch=position.epoch, examples=len(setup.train.data), device=str(device), world=world)
            started = time.perf_counter()
            with _catch_signals() as caught:
                position = fit(learner, setup.train, position, config.epochs,
                               evaluate_epoch=_evaluator(learner, setup, config), stop=caught, stop_after=stop_after,
                               save=lambda at: run.save(learner, at, setup, world), progress=progress,
                               world=world, run_dir=run.path)
            return _summary(learner, setup, config, run, position, time.perf_counter() - started)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resume(run_dir: str | Path, progress: Progress | None = None, stop_after: int | None = None,
           **changes) -> dict:
    """Continue the run in ``run_dir`` with its saved settings; only RESUME_MAY_CHANGE may differ."""
    config = RunFolder(run_dir).read_config()
    for key, value in changes.items():
        if key not in RESUME_MAY_CHANGE:
            raise ValueError(f"--resume continues with the run's saved settings; drop --{key.replace('_', '-')}")
        setattr(config, key, value)
    return train(config, run_dir, progress=progress, resume=True, stop_after=stop_after)


def _start(config: TrainConfig, world: int, local_rank: int) -> torch.device:
    """Join the process group under torchrun, pick the device and tune the CPU allocator."""
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo")
    device = resolve_device(config.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def _evaluator(learner: Learner, setup: Setup, config: TrainConfig) -> Callable[[int], dict]:
    """After an epoch: the evaluation split's loss and errors, every eval_every epochs and at the
    end (every epoch with a target); the last epoch's also with the run's test-time augmentation."""
    split = "val" if setup.test is not None else "test"

    def after(epoch: int) -> dict:
        last = epoch + 1 == config.epochs
        if (epoch + 1) % config.eval_every and not last and config.target is None:
            return {}
        metrics = {}
        for tta in ("none", config.tta) if last and config.tta != "none" else ("none",):
            result = evaluate(learner.eval_model, setup.evaluate, setup.preprocess, len(setup.classes), tta=tta,
                              precision=config.precision, memory_format=_memory_format(config))
            name = split if tta == "none" else f"{split}_tta"
            metrics.update({f"{name}_{key}": result[key] for key in ("loss", "top1_error", "top5_error")})
        return metrics

    return after


def _summary(learner: Learner, setup: Setup, config: TrainConfig, run: RunFolder, position: Position,
             seconds: float) -> dict:
    """What the run reached; the test split is read once, at the end of a run that held out a
    validation split."""
    done = finished(position.history, config.epochs)
    summary = {"run_dir": str(run.path), "model": resolve_name(config.model), "dataset": config.dataset,
               "epochs_done": position.epoch, "epochs": config.epochs, "finished": done, "seconds": seconds,
               "precision": config.precision, "last": position.history[-1] if position.history else {},
               "paper_error": paper_error(config.model, config.dataset, setup.classes, config.augment)}
    if config.target is not None and done and position.history[-1].get("target_reached"):
        summary["target"] = {"accuracy": config.target, "epoch": position.epoch,
                             "wall_seconds": position.history[-1]["wall_seconds"]}
    if setup.test is not None and done:
        for tta in ("none", config.tta) if config.tta != "none" else ("none",):
            result = evaluate(learner.eval_model, setup.test, setup.preprocess, len(setup.classes), tta=tta,
                              precision=config.precision, memory_format=_memory_format(config))
            summary["test" if tta == "none" else "test_tta"] = {k: result[k] for k in ("loss", "top1_error", "top5_error")}
    return summary


def _seed(config: TrainConfig, rank: int):
    torch.manual_seed(config.seed + rank)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def _catch_signals():
    """Record SIGINT / SIGTERM instead of dying, so the loop can checkpoint; a second one kills."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``root/MODEL-DATASET-TIME``, with ``-2``, ``-3``... where runs started in the same second."""
    base = Path(root) / f"{resolve_name(config.model).replace('_', '-')}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
