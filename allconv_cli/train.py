"""The trainer shared by train, eval and ablate: one loop, one evaluation, resumable run folders.

A run folder holds ``config.json`` (the resolved settings), ``model.safetensors`` (weights and
everything that rebuilds the model and its preprocessing), ``state.pt`` (optimizer, scheduler,
RNG, position; plain tensors and numbers, read with ``torch.load(weights_only=True)``),
``metrics.jsonl`` (one JSON object per epoch) and ``curves.png``. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli import checkpoint, datasets, preprocess as preprocessing
from allconv_cli.config import TrainConfig, from_json
from allconv_cli.device import autocast, resolve_device, tune_cpu_allocator
from allconv_cli.models import PAPER, create_model, resolve_name

CONFIG_NAME, STATE_NAME, METRICS_NAME, CURVES_NAME = "config.json", "state.pt", "metrics.jsonl", "curves.png"
RESUME_MAY_CHANGE = ("device", "workers")  # settings that do not change what is computed
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

Progress = Callable[..., None]  # progress(event, **fields); events: start, step, epoch


class TrainingStopped(Exception):
    """A signal stopped the run after a resumable checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, run_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume with: allconv train --resume {run_dir}")
        self.signum = signum


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing of that step was applied."""


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
    input_size = tuple(create_model(name).pretrained_cfg["input_size"])
    if config.crop >= min(input_size[1:]):
        raise ValueError(f"crop {config.crop} px is not smaller than {name}'s {input_size[1]}x{input_size[2]} "
                         f"input: give a smaller --crop")
    train = datasets.load_split(config.dataset, "train", config.data_dir, input_size, config.workers)
    train = datasets.limit(train, config.train_limit, config.seed)
    test = datasets.limit(datasets.load_split(config.dataset, "test", config.data_dir, input_size, config.workers),
                          config.test_limit, config.seed)
    if len(test.classes) != len(train.classes):
        raise ValueError(f"the train split has {len(train.classes)} classes and the test split "
                         f"{len(test.classes)}: give both the same class folders")
    validation = None
    if config.val_fraction > 0:
        train, validation = datasets.held_out(train, config.val_fraction, config.seed)
    model = create_model(name, **model_kwargs(config, len(train.classes)))
    if config.init is not None and preprocess_state is None:  # a resumed run restores its own state
        state, meta, tensors = checkpoint.load_weights(config.init)
        checkpoint.load_state(model, state, f"--init {config.init} holds {meta['model']} with "
                                            f"{meta.get('model_kwargs')}, which does not fit {name} with these settings")
        if meta["preprocess"]["kind"] != config.preprocess:
            raise ValueError(f"--init {config.init} was trained on {meta['preprocess']['kind']} inputs: "
                             f"give --preprocess {meta['preprocess']['kind']}")
        preprocess_state = (meta["preprocess"], tensors)  # the inputs its weights were learned for
    if preprocess_state is not None:
        prep = preprocessing.from_meta(*preprocess_state)
    else:
        prep = preprocessing.fit(config.preprocess, _fit_images(train, config.seed))
    model = model.to(device, memory_format=_memory_format(config))
    per_rank = max(1, config.batch_size // world)

    def batches(split, shuffle):
        return datasets.Batches(split, per_rank, shuffle=shuffle, drop_last=shuffle, seed=config.seed,
                                rank=rank, world=world, device=device, workers=config.workers)

    evaluate = validation if validation is not None else test
    return Setup(model, prep.to(device), train.classes, input_size, batches(train, True),
                 batches(evaluate, False), batches(test, False) if validation is not None else None)


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


# --- schedule -------------------------------------------------------------------------------

def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    """A per-step learning-rate schedule from torch's schedulers."""
    sched = torch.optim.lr_scheduler
    total = config.epochs * steps_per_epoch
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                pct_start=max(warmup, 1) / total, anneal_strategy="linear",
                                cycle_momentum=False, div_factor=10, final_div_factor=100)
    if config.schedule == "paper":
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


# --- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, batches: datasets.Batches, prep: nn.Module, num_classes: int,
             tta: bool = False, amp: bool = True, memory_format=torch.channels_last) -> dict:
    """Top-1 / top-5 error (%), mean loss, per-class accuracy (%) and the confusion matrix
    (rows: true class, columns: predicted). ``tta`` averages the softmax of the image and its
    mirror. Under DDP the counts are summed over all processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-5 hits
    for images, labels in batches.epoch(0):
        x = prep(images.float() / 255).contiguous(memory_format=memory_format)
        with autocast(device, amp):
            logits = model(x).float()
            if tta:
                logits = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)).div(2).log()
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, num_classes), dim=1).indices
        totals[1] += (top == labels[:, None]).any(1).sum()
        confusion.view(-1).index_add_(0, labels * num_classes + top[:, 0], torch.ones_like(labels))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    count = confusion.sum().item()
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1).double()
    return {
        "count": count,
        "loss": totals[0].item() / count,
        "top1_error": 100 * (1 - confusion.diag().sum().item() / count),
        "top5_error": 100 * (1 - totals[1].item() / count),
        "per_class_accuracy": (100 * per_class).tolist(),
        "confusion": confusion.cpu().tolist(),
    }


def paper_error(model: str, dataset: str, classes: list[str], augment: str) -> float | None:
    """The paper's test error (%) for this model on this data set, where it reports one."""
    errors = PAPER[resolve_name(model)]["error"]
    if dataset == "sample":
        return None  # 4,000 training images: not comparable with the paper's 50,000
    if dataset == "cifar10" or classes == CIFAR10_CLASSES:
        return errors.get("cifar10" if augment == "none" else "cifar10-aug")
    if dataset == "cifar100":
        return errors.get("cifar100")
    if len(classes) == 1000:
        return errors.get("imagenet")
    return None


# --- the loop -------------------------------------------------------------------------------

def train(config: TrainConfig, run_dir: str | Path, progress: Progress | None = None,
          resume: bool = False, stop_after: int | None = None) -> dict:
    """Train ``config`` into ``run_dir`` (or continue it there with ``resume``) -> summary.

    ``stop_after`` ends this call, resumably, after that many epochs. SIGINT / SIGTERM finish
    the current step, write a resumable checkpoint and raise TrainingStopped.
    """
    run_dir = Path(run_dir)
    rank, world, local_rank = _distributed()
    if progress is None or rank != 0:
        progress = lambda event, **fields: None  # noqa: E731  (only rank 0 reports)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    device = resolve_device(config.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    state = _load_state(run_dir, config) if resume else None
    _seed(config, rank)
    setup = build(config, device, rank, world,
                  preprocess_state=(state["preprocess_meta"], state["preprocess_tensors"]) if state else None)
    model = setup.model
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config, len(setup.train))
    ema = None
    if config.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay)
    mixup, criterion = _loss(config, len(setup.classes))
    history: list[dict] = []
    start_epoch = start_step = 0
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_step, history = state["epoch"], state["step"], json.loads(state["history"])
        sums = state["sums"].to(device)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    elif rank == 0:
        checkpoint.atomic_write_text(run_dir / CONFIG_NAME, config.to_json())
    step_model = model
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        step_model = torch.compile(step_model)
    memory_format = _memory_format(config)
    eval_model = ema.module if ema is not None else model
    generator = torch.Generator(device=device)
    paper = paper_error(config.model, config.dataset, setup.classes, config.augment)
    progress("start", config=config, run_dir=run_dir, classes=setup.classes, steps=len(setup.train),
             start_epoch=start_epoch, examples=len(setup.train.data), device=str(device), world=world)

    def save(epoch: int, step: int, metrics: dict | None):
        if rank != 0:
            return
        prep_meta, prep_tensors = setup.preprocess.to_meta()
        meta = {"model": resolve_name(config.model), "model_kwargs": model_kwargs(config, len(setup.classes)),
                "classes": setup.classes, "input_size": list(setup.input_size), "preprocess": prep_meta,
                "dataset": config.dataset, "data_dir": config.data_dir, "augment": config.augment,
                "epoch": epoch, "metrics": metrics or {}, "paper_error": paper}
        checkpoint.save_weights(run_dir / checkpoint.WEIGHTS_NAME, eval_model, meta, preprocess=prep_tensors)
        payload = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "step": step, "sums": sums.cpu(), "history": json.dumps(history),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "preprocess_meta": prep_meta, "preprocess_tensors": prep_tensors,
            "config": config.to_json(),
        }
        checkpoint.atomic_write(run_dir / STATE_NAME, lambda tmp: torch.save(payload, tmp))

    epochs_run = 0
    started = time.perf_counter()
    with _catch_signals() as caught:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            epoch_start = time.perf_counter()
            seen_at_start = sums[2].item()
            for step, (images, labels) in enumerate(setup.train.epoch(epoch, start_step), start=start_step):
                generator.manual_seed(_step_seed(config.seed, rank, epoch, step))
                x = datasets.augment(images, config.augment, generator,
                                     size=config.crop if epoch < config.crop_epochs else None)
                x = setup.preprocess(x.float() / 255).contiguous(memory_format=memory_format)
                target = labels
                if mixup is not None:
                    np.random.seed(_step_seed(config.seed, rank, epoch, step) % 2**32)
                    x, target = mixup(x, labels)
                with autocast(device, config.amp):
                    logits = step_model(x)
                    loss = criterion(logits.float(), target)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; nothing of "
                        f"that step was applied and {run_dir} keeps the last good checkpoint (epoch "
                        f"{len(history)}). Lower --lr, or add --batch-norm")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses, before the schedule moves on
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update(model)
                with torch.no_grad():
                    sums += torch.stack([loss.detach().double() * len(labels),
                                         (logits.argmax(1) == labels).sum().double(),
                                         torch.full((), float(len(labels)), dtype=torch.float64, device=device)])
                if (step % 10 == 0 or step + 1 == len(setup.train)):
                    seen = sums[2].item()
                    progress("step", epoch=epoch, step=step + 1, steps=len(setup.train),
                             loss=sums[0].item() / seen, accuracy=100 * sums[1].item() / seen,
                             images_per_s=world * (seen - seen_at_start) / (time.perf_counter() - epoch_start),
                             lr=lr)
                if caught:
                    save(epoch, step + 1, history[-1] if history else None)
                    raise TrainingStopped(caught[0], run_dir)
            start_step = 0
            metrics = _epoch_metrics(epoch, sums, world, time.perf_counter() - epoch_start, lr)
            sums.zero_()
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                result = evaluate(eval_model, setup.evaluate, setup.preprocess, len(setup.classes),
                                  amp=config.amp, memory_format=memory_format)
                split = "val" if setup.test is not None else "test"
                metrics.update({f"{split}_loss": result["loss"], f"{split}_top1_error": result["top1_error"],
                                f"{split}_top5_error": result["top5_error"]})
            history.append(metrics)
            save(epoch + 1, 0, metrics)
            if rank == 0:
                _write_metrics(run_dir, history)
            progress("epoch", metrics=metrics, epochs=config.epochs)
            epochs_run += 1
            if stop_after is not None and epochs_run >= stop_after and epoch + 1 < config.epochs:
                break
    summary = {"run_dir": str(run_dir), "model": resolve_name(config.model), "dataset": config.dataset,
               "epochs_done": len(history), "epochs": config.epochs, "finished": len(history) == config.epochs,
               "seconds": time.perf_counter() - started, "paper_error": paper, "last": history[-1]}
    if setup.test is not None and summary["finished"]:
        result = evaluate(eval_model, setup.test, setup.preprocess, len(setup.classes),
                          amp=config.amp, memory_format=memory_format)
        summary["test"] = {k: result[k] for k in ("loss", "top1_error", "top5_error")}
    if world > 1:
        torch.distributed.barrier()
    return summary


def _loss(config: TrainConfig, num_classes: int):
    """(mixup or None, criterion): CutMix/Mixup with soft targets for ``strong`` augmentation."""
    if config.augment == "strong":
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=config.label_smoothing,
                      num_classes=num_classes, mode="batch")
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def _seed(config: TrainConfig, rank: int):
    torch.manual_seed(config.seed + rank)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """Augmentation seed of one step: any step can be replayed after a resume."""
    return ((seed * 1_000_003 + rank) * 10_007 + epoch) * 1_000_003 + step


def _epoch_metrics(epoch, sums, world, seconds, lr: float) -> dict:
    if world > 1:
        torch.distributed.all_reduce(sums)
    seen = sums[2].item()
    return {"epoch": epoch + 1, "train_loss": sums[0].item() / seen, "train_accuracy": 100 * sums[1].item() / seen,
            "lr": lr, "seconds": seconds, "images_per_s": seen / seconds}


def _write_metrics(run_dir: Path, history: list[dict]):
    checkpoint.atomic_write_text(run_dir / METRICS_NAME, "".join(json.dumps(m) + "\n" for m in history))
    from allconv_cli.charts import learning_curves

    learning_curves(history, run_dir / CURVES_NAME)


def _load_state(run_dir: Path, config: TrainConfig) -> dict:
    path = run_dir / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {STATE_NAME} to resume from: give the folder of a "
                                "run that allconv train started")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several kinds
        raise ValueError(f"{path} cannot be read ({type(err).__name__}); it is not an allconv training "
                         "state, or it is damaged") from None
    saved, given = json.loads(state["config"]), json.loads(config.to_json())
    changed = sorted(k for k in given if k not in RESUME_MAY_CHANGE and saved.get(k) != given[k])
    if changed:
        raise ValueError(f"{run_dir} was started with other settings ({', '.join(changed)}); resume it with "
                         "its own (allconv train --resume RUN) or start a new run")
    if state["epoch"] >= config.epochs:
        raise ValueError(f"{run_dir} already finished all {config.epochs} epochs; nothing to resume "
                         "(start a new run, e.g. with --epochs)")
    return state


def load_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {CONFIG_NAME}): give the folder "
                                "that allconv train wrote")
    return from_json(path.read_text())


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


def run_name(config: TrainConfig) -> str:
    return f"{resolve_name(config.model).replace('_', '-')}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def evaluate_checkpoint(path: str | Path, dataset: str | None = None, data_dir: str | None = None,
                        split: str = "test", tta: bool = False, batch_size: int = 256,
                        device: str = "auto", limit: int | None = None, workers: int = 2) -> dict:
    """Evaluate a run folder or checkpoint on a split -> metrics, classes and the paper's error."""
    dev = resolve_device(device)
    model, meta, tensors = checkpoint.load_model(path, dev)
    dataset = dataset or meta.get("dataset")
    if dataset is None:
        raise ValueError(f"{path} does not say which data set it was trained on: give --dataset")
    data_dir = data_dir if data_dir is not None else (meta.get("data_dir") if dataset == meta.get("dataset") else None)
    input_size = tuple(meta["input_size"])
    data = datasets.limit(datasets.load_split(dataset, split, data_dir, input_size, workers), limit)
    classes = meta["classes"]
    if len(data.classes) != len(classes):
        raise ValueError(f"{path} predicts {len(classes)} classes but {dataset} has {len(data.classes)}: "
                         "evaluate on the data set it was trained on")
    prep = preprocessing.from_meta(meta["preprocess"], tensors).to(dev)
    model = model.to(memory_format=torch.channels_last)
    batches = datasets.Batches(data, batch_size, shuffle=False, device=dev, workers=workers)
    result = evaluate(model, batches, prep, len(classes), tta=tta)
    result.update({"classes": classes, "dataset": dataset, "split": split, "checkpoint": str(path),
                   "model": meta["model"], "epoch": meta.get("epoch"), "tta": tta,
                   "paper_error": paper_error(meta["model"], dataset, classes, meta.get("augment", "none"))})
    return result
