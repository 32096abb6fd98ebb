"""Every training setting, declared once: its type, default, help, choices, range and the paper's value.

``TrainConfig``'s fields are the single source for the settings' checks (``settings``), the
options of ``allconv train``, ``ablate`` and ``benchmark`` (generated from the fields by
``cli.options``, so no default, choice or range is written twice), the run folder's
``config.json`` and the deviations from the paper that a run names (``settings.deviations``);
an optimizer's own settings are declared in its entry (``optimizers``) and
join the fields here. Torch-free: ``allconv --help`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from allconv_cli import __version__
from allconv_cli.choices import (
    AUGMENTATIONS,
    FLIPS,
    PRECISIONS,
    PREPROCESSING,
    SCHEDULES,
    TTA,
    WEIGHT_INITS,
    WHITEN,
)
from allconv_cli.data.sources import DATA_SOURCES
from allconv_cli.train.fields import (
    ABOVE_0,
    AT_LEAST_1,
    AUGMENTATION,
    DATA,
    DROPOUT,
    NETWORK,
    OPTIMIZER,
    RUN,
    SCHEDULE,
    UNIT,
    setting,
)
from allconv_cli.train.optimizers import OPTIMIZERS, optimizer_settings

# Saved settings (config.json, a state's) say which defaults they were written under, and which
# allconv wrote them. Those written under earlier defaults (version 1: no key) ran a setting they
# lack, one added since, at the value it had then, and a null network option as a model's row or
# else those defaults stated it: the preset named here holds each earlier version's defaults, and
# settings.from_json reads them from it (so that preset's values must not change).
DEFAULTS_KEY, DEFAULTS_VERSION, WRITER_KEY = "defaults_version", 2, "allconv"
EARLIER_DEFAULTS = {1: "faithful"}

MAX_WORKERS = 256  # data-loading processes of one run: above the cores of the largest machines


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the fast recipe: the paper's All-CNN-C with
    BatchNorm and without dropout, Muon for the conv weights, a one-cycle schedule, label smoothing
    and airbench's whitened first conv, on the bundled sample. They deviate from the paper because
    the paper's recipe, and every faithful variation measured, stays at chance for whole runs on
    some data (100 classes; the digits in 45 steps), where this one learns on every kind measured
    (docs/RESULTS.md, issue #44); ``--preset faithful`` and the ``paper-*`` presets train the
    paper's network and optimizer. Each value was kept or changed by ablations on a validation
    split held out of CIFAR-10's training set (docs/RESULTS.md, issue #23)."""

    # what to train
    model: str = setting("all-cnn-c", "Registry name (see 'allconv models').", panel=NETWORK,
                         flags=("--model", "-m"))
    # The network's options: the recipe's (BatchNorm lets the 9-layer net take a large rate, and
    # without dropout short runs learn faster; the paper's 20 % / 50 % only slowed learning,
    # docs/RESULTS.md), where neither a preset, the options given nor a variant's row states one
    # (settings.network_options says in which order).
    batch_norm: bool = setting(True, "BatchNorm after every conv (a deviation).", panel=NETWORK)
    class_relu: bool = setting(True, "The paper's ReLU after the class conv.", panel=NETWORK)
    drop_input: float = setting(0.0, "Dropout on the input (the paper's 0.2).", panel=NETWORK, check=DROPOUT)
    drop_rate: float = setting(0.0, "Dropout after each pool or its conv (the paper's 0.5).", panel=NETWORK,
                               check=DROPOUT)
    # data
    dataset: str = setting("sample", "The data set; sample is bundled.", panel=DATA,
                           choices=DATA_SOURCES, flags=("--dataset", "-d"))
    data_dir: str | None = setting(None, "Folder of the data set.", panel=DATA,
                                   default_text="data for CIFAR")
    preprocess: str = setting("standardize", "Per-channel standardization, or the paper's GCN + ZCA.", panel=DATA,
                              choices=PREPROCESSING, paper="zca")
    augment: str = setting("paper", "Flips and shifts (paper), also CutMix/Mixup (strong), or none.",
                           panel=AUGMENTATION, choices=AUGMENTATIONS, paper=("none", "paper"))
    # 2 px, not the paper's 5: short runs underfit, and 2 px measured 1.3 points better
    shift: int = setting(2, "How far (px) translations reach (the paper's 5).", panel=AUGMENTATION,
                         check=(lambda v: v >= 0, "of at least 0 (px; 0 turns translations off)"), paper=5)
    crop: int = setting(0, "Side (px) of random crops in the first --crop-epochs.", panel=AUGMENTATION,
                        check=(lambda v: v >= 0, "of at least 0 (px; 0 turns crops off)"), paper=0)
    crop_epochs: int = setting(0, "How many first epochs train on --crop windows.", panel=AUGMENTATION,
                               check=(lambda v: v >= 0, "of at least 0"))
    flips: str = setting("alternate", "A coin per image and step, or every other epoch.", panel=AUGMENTATION,
                         choices=FLIPS, paper="random")
    val_fraction: float = setting(0.0, "Share of train held out for evaluation.", panel=DATA, check=UNIT)
    train_limit: int | None = setting(None, "Use at most this many training images.", panel=DATA,
                                      check=(lambda v: v >= 1, "of at least 1 (leave it out to use every image)"),
                                      default_text="every image")
    test_limit: int | None = setting(None, "Use at most this many test images.", panel=DATA,
                                     check=(lambda v: v >= 1, "of at least 1 (leave it out to use every image)"),
                                     default_text="every image")
    shuffle_labels: bool = setting(False, "Permute the training labels once (sanity --against).", panel=DATA)
    # optimization (the paper's, Section 3.2: SGD, momentum 0.9, weight decay 0.001, lr from a grid)
    epochs: int = setting(30, "Epochs to train.", panel=SCHEDULE, check=AT_LEAST_1)
    # twice the steps of 256 in the same epochs: 2.0 and 2.6 points better (two seeds), and no
    # slower on a CPU; 512 measured worse
    batch_size: int = setting(128, "Global batch size, split over DDP processes.", panel=OPTIMIZER, check=AT_LEAST_1,
                              flags=("--batch-size", "-b"))
    # BatchNorm lets the 9-layer net take 0.2; with --optimizer muon it is the BatchNorm parameters' rate
    lr: float = setting(0.2, "Peak learning rate (the paper's grid: 0.25, 0.1, 0.05, 0.01).", panel=OPTIMIZER,
                        check=ABOVE_0,
                        paper=(0.25, 0.1, 0.05, 0.01))
    momentum: float = setting(0.9, "SGD momentum (the paper's 0.9).", panel=OPTIMIZER, check=UNIT, paper=0.9)
    nesterov: bool = setting(True, "Nesterov momentum.", panel=OPTIMIZER, paper=False)
    # Muon holds each conv's weight norm fixed, so decay has nothing to do there; before Muon, SGD's
    # 5e-4 on conv weights only measured best
    weight_decay: float = setting(0.0, "Weight decay (the paper's 0.001).", panel=OPTIMIZER,
                                  check=(lambda v: v >= 0, "of at least 0"), paper=0.001)
    schedule: str = setting("onecycle", "The learning rate's schedule.", panel=SCHEDULE, choices=SCHEDULES,
                            paper="paper")
    milestones: list[int] = setting([200, 250, 300], "Epochs of the paper schedule's steps, comma-separated.",
                                    panel=SCHEDULE,
                                    check=(lambda v: all(m >= 1 for m in v) and v == sorted(set(v)),
                                           "of increasing epochs of at least 1, e.g. [200, 250, 300]"),
                                    paper=[200, 250, 300])
    gamma: float = setting(0.1, "The paper schedule's factor at each milestone.", panel=SCHEDULE, check=ABOVE_0,
                           paper=0.1)
    warmup_epochs: float = setting(1.5, "Linear warm-up from lr / 10, in epochs.", panel=SCHEDULE,
                                   check=(lambda v: v >= 0, "of at least 0 (epochs)"), paper=0.0)
    label_smoothing: float = setting(0.2, "Label smoothing.", panel=OPTIMIZER, check=UNIT, paper=0.0)
    weight_init: str = setting("xavier-open", "How the convs start.", panel=NETWORK,
                               choices=WEIGHT_INITS)
    # airbench's five ideas (whiten, dirac, flips, bias_lr_scale, lookahead_decay), taken together:
    # each alone ended within noise at full scale, but together they ended 0.6 and 1.3 points ahead
    # on two seeds, and the frozen first conv makes steps about 5 % faster (no gradient for it)
    whiten: str = setting("frozen", "The first conv as the whitening of image patches.", panel=NETWORK,
                          choices=WHITEN, paper="off")
    dirac: bool = setting(True, "Identity filters to start the convs after the first.", panel=NETWORK,
                          paper=False)
    decay_all: bool = setting(False, "Weight decay on every parameter, or on conv weights only.", panel=OPTIMIZER,
                              flags=("--decay-all/--decay-weights-only",), paper=True)
    bn_momentum: float = setting(0.1, "Weight of each batch in BatchNorm's statistics.", panel=NETWORK,
                                 check=(lambda v: 0 < v <= 1, "in (0, 1] (the weight of each batch in the running "
                                                              "statistics)"))
    # Muon: 9.92 % validation error against Nesterov SGD's 11.78 (All-CNN-C, ten CIFAR-10 epochs)
    optimizer: str = setting("muon", "The optimizer.", panel=OPTIMIZER, choices=OPTIMIZERS,
                             paper="sgd")
    bias_lr_scale: float = setting(64.0, "The biases' learning rate as a multiple of --lr.", panel=OPTIMIZER,
                                   check=(lambda v: v > 0, "above 0 (1 gives biases the weights' learning rate)"),
                                   paper=1.0)
    init: str | None = setting(None, "Start from these weights (a run folder or .safetensors).", panel=NETWORK,
                               default_text="a fresh initialization")
    ema_decay: float = setting(0.0, "Per-step decay of an EMA of the weights.", panel=OPTIMIZER,
                               check=(lambda v: 0 <= v < 1, "in [0, 1) (0 turns EMA off)"), paper=0.0)
    lookahead_decay: float = setting(0.95, "Lookahead's per-step decay at the run's end.", panel=OPTIMIZER,
                                     check=(lambda v: 0 <= v < 1, "in [0, 1) (0 turns lookahead off)"), paper=0.0)
    tta: str = setting("flip-shift", "Test-time augmentation of the final evaluations.", panel=AUGMENTATION,
                       choices=TTA, paper="none")
    target: float | None = setting(None, "Stop once the top-1 accuracy (%) reaches this.", panel=SCHEDULE,
                                   check=(lambda v: 0 < v <= 100, "in (0, 100] (top-1 accuracy, %)"),
                                   default_text="every epoch runs")
    # machinery
    seed: int = setting(0, "Seed of initialization, order, augmentation and dropout.", panel=RUN,
                        # torch's generators take 64 bits; the per-epoch and per-step seeds made from it stay below 2^63
                        check=(lambda v: 0 <= v < 2**63, "in [0, 2^63)"))
    deterministic: bool = setting(False, "Deterministic kernels (slower on CUDA), a CPU thread per core.",
                                  panel=RUN)
    device: str = setting("auto", "auto (the first GPU, else the CPU), cpu, cuda or cuda:N.", panel=RUN)
    precision: str = setting("auto", "Autocast of the forward and backward passes.", panel=RUN, choices=PRECISIONS)
    channels_last: bool = setting(True, "channels_last memory format.", panel=RUN)
    compile: bool = setting(False, "torch.compile the training step.", panel=RUN)
    # Decoding is CPU-bound: past the cores another worker only adds a process (and a decode thread),
    # and a count in the thousands would start that many.
    workers: int = setting(4, "DataLoader workers for folders too large for memory.", panel=DATA,
                           check=(lambda v: 0 <= v <= MAX_WORKERS, f"from 0 to {MAX_WORKERS}"))
    eval_every: int = setting(1, "Evaluate every N epochs (and always the last).", panel=RUN,
                              check=(lambda v: v >= 1, "of at least 1 (epochs)"))
    # A checkpoint of All-CNN-C with ZCA writes 54 MB (the weights with the 36 MiB matrix, then weights and
    # momentum): at every epoch of a GPU run, whose epochs take seconds, mostly needless. A kill loses at
    # most the epochs since the last checkpoint, which these two bound.
    save_every: int = setting(10, "Checkpoint every N epochs (and at every stop).", panel=RUN,
                              check=(lambda v: v >= 1, "of at least 1 (epochs; 1 checkpoints every epoch)"))
    save_minutes: float = setting(5.0, "Checkpoint sooner once this many minutes have passed.", panel=RUN,
                                  check=(lambda v: v >= 0, "of at least 0 (minutes; 0 checkpoints every epoch)"))
    preset: str | None = setting(None, "A bundled preset or a .toml file; options override it.", panel=RUN,
                                 flags=("--preset", "-p"), default_text="none")

    def to_json(self, **records) -> str:
        """The settings as JSON, with ``records`` (e.g. ``environment``) beside them: keys that are
        no setting, which reading them back drops."""
        return json.dumps({**dataclasses.asdict(self), DEFAULTS_KEY: DEFAULTS_VERSION, WRITER_KEY: __version__,
                           **records}, indent=2)


# Then the settings that an optimizer brings (train/optimizers.py), declared in its entry.
TrainConfig = dataclasses.make_dataclass("TrainConfig", optimizer_settings(), bases=(TrainConfig,),
                                         namespace={"__doc__": TrainConfig.__doc__, "__module__": __name__})

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

TYPES = typing.get_type_hints(TrainConfig)
WHOLE, NUMBER = "a whole number", "a finite number"


def kind(name: str) -> type:
    """A setting's type without None: ``int | None`` -> int."""
    hint = TYPES[name]
    return next(a for a in typing.get_args(hint) if a is not type(None)) if isinstance(hint, types.UnionType) else hint


def allowed(name: str) -> str:
    """What a setting takes, in words: "a whole number of at least 1", "one of sgd, muon"."""
    words = {bool: "true or false", int: WHOLE, float: NUMBER, str: "a string"}.get(kind(name), "a list of whole numbers")
    meta = FIELDS[name].metadata
    if meta["check"] is not None:
        return f"{words} {meta['check'][1]}"
    if meta["choices"] is not None:
        return f"one of {', '.join(meta['choices'])}"
    return words


def shown_default(name: str) -> str:
    """A setting's default as its option's help shows it: on / off, 200,250,300, 0.05."""
    meta, default = FIELDS[name].metadata, FIELDS[name].default
    if FIELDS[name].default_factory is not dataclasses.MISSING:
        default = FIELDS[name].default_factory()
    if default is None:
        return meta["default_text"]
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return ",".join(map(str, default))
    return f"{default:g}" if isinstance(default, float) else str(default)


def preset_dir():
    """The presets shipped in the wheel (``allconv_cli/presets``), or the repository's own."""
    bundled = resources.files("allconv_cli") / "presets"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parents[2] / "presets"



def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in preset_dir().iterdir() if p.name.endswith(".toml"))

