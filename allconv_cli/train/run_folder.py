"""The one reader and writer of a run folder: ``config.json`` (the resolved settings),
``model.safetensors`` (weights and what rebuilds the model and its preprocessing: the exported,
self-contained artifact), ``state.pt`` (optimizer, scheduler, EMA, fp16's loss scale, every rank's
RNG, position; plain tensors and numbers, read with ``torch.load(weights_only=True)`` and
validated), ``preprocess.safetensors`` (what rebuilds the preprocessing on resume, written once:
its tensors, or for a ZCA whitening fitted on the training images the digests that check its
refit, 24 KB where the matrix is 36 MiB: ``preprocess.kept``),
``metrics.jsonl`` (one JSON object per epoch, written every epoch, checkpoint or not),
``curves.png`` and ``.lock`` (held for the whole run).

A checkpoint (``model.safetensors``, then ``state.pt``) is taken at the cadence of the settings
``save_every`` / ``save_minutes`` and always at a run's end, a stop and the target (``loop.fit``).
After a kill, ``metrics.jsonl`` can list epochs past ``state.pt``'s: the resume computes them
again, bit-exactly, and rewrites it. A resume reads ``config.json``, ``state.pt`` and
``preprocess.safetensors`` alone (11 MB for All-CNN-C): the weights file is the self-contained
artifact (its ZCA matrix included) that eval, visualize and export read."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from allconv_cli.charts import learning_curves
from allconv_cli.data import preprocess as preprocessing
from allconv_cli.evaluate import paper_error
from allconv_cli.files.weights import WEIGHTS_NAME, save_weights
from allconv_cli.models.registry import network_name, resolve_name
from allconv_cli.train.config import TrainConfig
from allconv_cli.train.learner import Learner, Setup
from allconv_cli.train.loop import Position
from allconv_cli.train.settings import from_json, model_kwargs
from allconv_cli.util import atomic_write, atomic_write_text, read_text

CONFIG_NAME, STATE_NAME, PREPROCESS_NAME, METRICS_NAME, CURVES_NAME, LOCK_NAME = (
    "config.json", "state.pt", "preprocess.safetensors", "metrics.jsonl", "curves.png", ".lock")


RUN_FILES = (CONFIG_NAME, STATE_NAME, PREPROCESS_NAME, WEIGHTS_NAME, METRICS_NAME, CURVES_NAME)
# What continues a run on another machine: a resume reads the settings, the state and the
# preprocessing (a ZCA whitening's digest, fitted again), and the metrics are its history so far;
# the weights (43 MB with a ZCA matrix) are written again at its next checkpoint.
CARRIED_FILES = (CONFIG_NAME, STATE_NAME, PREPROCESS_NAME, METRICS_NAME)


# 3: the preprocessing's tensors live in preprocess.safetensors; format 2 carried them (and their
# description) in every state.pt, and is still read, so that a run begun before resumes.
# 4: preprocess.safetensors may hold a ZCA whitening's digests instead of its tensors, which an
# allconv reading format 3 could not resume from; a format 3 folder (its tensors) still resumes.
STATE_FORMAT = 4
READ_FORMATS = (2, 3, STATE_FORMAT)
PREPROCESS_KEY = "preprocess"  # preprocess.safetensors' metadata entry: the description (kind, GCN scale...) as JSON


# settings that do not change what is computed, only where, how fast, or how often it is saved
RESUME_MAY_CHANGE = ("device", "workers", "save_every", "save_minutes")


# state.pt's entries and their types: what a valid file holds, checked on every load
_STATE_TYPES = {
    "format": int, "config": str, "epoch": int, "step": int, "sums": torch.Tensor, "history": str,
    "model": dict, "optimizer": dict, "scheduler": dict, "ema": (dict, type(None)), "world": int,
    "lookahead": (dict, type(None)),
    "scaler": (dict, type(None)),  # fp16's GradScaler; absent (None) in states written before it was saved
    "rng_cpu": torch.Tensor, "rng_cuda": (torch.Tensor, type(None)),
}
_FORMAT_2_TYPES = {**_STATE_TYPES, "preprocess_meta": dict, "preprocess_tensors": dict}


class RunFolder:
    """The one reader and writer of a run folder. Only rank 0 writes; every write is atomic, and
    ``state.pt`` is written last, so a kill at any instant leaves a consistent, resumable run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def carried_files(self, finished: bool = False) -> list[Path]:
        """The files that continue this run elsewhere (CARRIED_FILES); of a ``finished`` run only
        its settings and metrics."""
        names = (CONFIG_NAME, METRICS_NAME) if finished else CARRIED_FILES
        return [self.path / name for name in names if (self.path / name).is_file()]

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    @contextlib.contextmanager
    def lock(self):
        """Hold ``.lock`` for the run; another process gets one line naming the holder. The
        kernel releases the lock when the holder dies, so a killed run leaves none behind."""

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

    def begin(self, config: TrainConfig, replace: bool, environment: dict | None = None):
        """Start a new run here: refuse a folder that holds one unless ``replace``; ``environment``
        (what the run started on: its CPU threads) is recorded beside the settings."""
        self.refuse_a_run(replace)
        if self.holds_run():
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        atomic_write_text(self.path / CONFIG_NAME, config.to_json(environment=environment or {}))

    def read_config(self) -> TrainConfig:
        path = self.path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run folder (no {CONFIG_NAME}): give the folder "
                                    "that allconv train wrote")
        try:
            text = read_text(path)
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not an allconv run configuration (not UTF-8 text): give the folder "
                             "that allconv train wrote") from None
        return from_json(text, str(path))

    def read_state(self, config: TrainConfig) -> dict | None:
        """``state.pt``, checked for structure and for the settings it was started with, with the
        run's preprocessing as ``state["preprocess"]`` = (description, tensors), read from
        ``preprocess.safetensors`` (from ``state.pt`` itself in format 2); None for a run that was
        stopped before its first checkpoint (it starts again from scratch)."""
        path = self.path / STATE_NAME
        if not path.is_file():
            if not (self.path / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"{self.path} has no {STATE_NAME} to resume from: give the folder of "
                                        "a run that allconv train started")
            _check_same(self.read_config(), config, self.path)
            return None
        state = _load_state(path)
        _check_same(from_json(state["config"], str(path)), config, self.path)
        if state["format"] == 2:
            state["preprocess"] = state.pop("preprocess_meta"), state.pop("preprocess_tensors")
        else:
            state["preprocess"] = self.read_preprocess()
        return state

    def write_preprocess(self, meta: dict, tensors: dict[str, torch.Tensor]):
        """``preprocess.safetensors``: what ``preprocess.kept`` gives, its description as JSON in
        the metadata. Once a run: it never changes."""
        plain = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        atomic_write(self.path / PREPROCESS_NAME,
                     lambda tmp: save_file(plain, str(tmp), metadata={PREPROCESS_KEY: json.dumps(meta)}))

    def read_preprocess(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``preprocess.safetensors`` -> (description, tensors), as ``preprocess.restore`` takes them."""
        path = self.path / PREPROCESS_NAME
        fix = f"restore it, continue from the weights with --init {self.path}, or start a new run"
        if not path.is_file():
            raise ValueError(f"{self.path} has a {STATE_NAME} but no {PREPROCESS_NAME} (the run's preprocessing): "
                             f"{fix}")
        try:
            with safe_open(str(path), "pt") as f:
                meta, names = json.loads((f.metadata() or {})[PREPROCESS_KEY]), f.keys()
                tensors = {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError, KeyError, ValueError) as err:  # ValueError: bad JSON as well
            raise ValueError(f"{path} cannot be read ({type(err).__name__}); it is damaged or not allconv's: "
                             f"{fix}") from None
        if not isinstance(meta, dict) or "kind" not in meta:
            raise ValueError(f"{path}: its {PREPROCESS_KEY} metadata does not describe a preprocessing: {fix}")
        refit = meta.get("refit")
        if refit is not None and not (meta["kind"] == "zca" and isinstance(refit, dict)
                                      and all(isinstance(refit.get(k), str) for k in ("data", "fit"))
                                      and tensors.keys() == {"zca_mean", "zca_diagonal"}):
            raise ValueError(f"{path}: its digests of the ZCA whitening to fit again are damaged: {fix}")
        return meta, tensors

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
            if learner.scaler is not None and state.get("scaler"):  # the loss scale goes on where it was
                learner.scaler.load_state_dict(state["scaler"])
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
        """A checkpoint: the preprocessing (once a run), weights, metrics and chart, then the
        state: on every rank (they take part in gathering the metric sums and RNG states); rank 0
        writes."""
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
        if not (self.path / PREPROCESS_NAME).is_file():  # the run's first checkpoint (or first since format 2)
            self.write_preprocess(*preprocessing.kept(setup.preprocess))
        meta = {"model": resolve_name(config.model), "model_kwargs": model_kwargs(config, len(setup.classes)),
                "classes": setup.classes, "input_size": list(setup.input_size), "preprocess": prep_meta,
                "dataset": config.dataset, "data_dir": config.data_dir, "augment": config.augment,
                "precision": config.precision, "epoch": position.epoch,
                "metrics": position.history[-1] if position.history else {},
                "paper_error": paper_error(config.model, model_kwargs(config, len(setup.classes)), config.dataset,
                                           setup.classes, config.augment)}
        save_weights(self.path / WEIGHTS_NAME, learner.eval_model, meta, preprocess=prep_tensors)
        if position.history:
            self.write_metrics(position.history)
        payload = {
            "format": STATE_FORMAT, "config": config.to_json(), "epoch": position.epoch, "step": position.step,
            "sums": sums.cpu(), "history": json.dumps(position.history), "world": world,
            "model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
            "ema": learner.ema.state_dict() if learner.ema is not None else None,
            "lookahead": learner.lookahead.state_dict() if learner.lookahead is not None else None,
            "scaler": learner.scaler.state_dict() if learner.scaler is not None else None,
            "rng_cpu": rng_cpu.cpu(), "rng_cuda": None if rng_cuda is None else rng_cuda.cpu(),
        }
        atomic_write(self.path / STATE_NAME, lambda tmp: torch.save(payload, tmp))

    def write_metrics(self, history: list[dict]):
        """metrics.jsonl and curves.png: at every checkpoint, and at every epoch's end between them."""
        atomic_write_text(self.path / METRICS_NAME, "".join(json.dumps(m) + "\n" for m in history))
        config = self.read_config()
        learning_curves(history, self.path / CURVES_NAME,
                        title=f"{self.path.name}: {network_name(config.model, dataclasses.asdict(config))[0]} on "
                              f"{config.dataset}")


def _load_state(path: Path) -> dict:
    """``state.pt`` of a format this version reads, checked for structure."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several kinds
        raise ValueError(f"{path} cannot be read ({type(err).__name__}); it is not an allconv training "
                         "state, or it is damaged") from None
    types = _FORMAT_2_TYPES if isinstance(state, dict) and state.get("format") == 2 else _STATE_TYPES
    bad = ([k for k, kind in types.items() if not isinstance(state.get(k), kind)]
           if isinstance(state, dict) else ["its structure"])
    if bad or state["format"] not in READ_FORMATS or state["sums"].shape != (3,):
        raise ValueError(f"{path} is not an allconv training state of format {' or '.join(map(str, READ_FORMATS))} "
                         f"({', '.join(bad) or 'format or sums'} wrong; an older allconv's state cannot be "
                         f"resumed): continue from its weights with --init {path.parent}, or start a new run")
    return state


def _check_same(saved: TrainConfig, config: TrainConfig, run_dir: Path):
    given, saved = (json.loads(c.to_json()) for c in (config, saved))
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
