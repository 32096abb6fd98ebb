"""Training settings in three layers: dataclass defaults, a preset (flat TOML in ``presets/``),
then the options given on the command line. ``None`` means "not given" at every layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from timm.models import get_pretrained_cfg_value

from allconv_cli.data.datasets import (
    AUGMENTATIONS,
    DATASETS,
    check_folder,
    check_source,
)
from allconv_cli.data.preprocess import KINDS
from allconv_cli.device import PRECISIONS
from allconv_cli.evaluate import TTA
from allconv_cli.files.weights import check_weights_file
from allconv_cli.models.initialization import WEIGHT_INITS
from allconv_cli.models.registry import (
    MODEL_OPTIONS,
    list_models,
    model_options,
    resolve_name,
)
from allconv_cli.util import did_you_mean, show_value

SCHEDULES = ("paper", "cosine", "onecycle", "constant")


FLIPS = ("random", "alternate")


WHITEN = ("off", "init", "frozen")


OPTIMIZERS = ("sgd", "muon")


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults train the faithful All-CNN-C on the
    bundled sample with the paper's optimizer and a cosine schedule."""

    # what to train
    model: str = "all-cnn-c"
    # The model's options. None: the model's own (registry.model_options): the paper's for its
    # networks, a variant's for a variant (all-cnn-c-bn: BatchNorm, no input dropout, 25 %);
    # a value given here overrides the variant's, as keyword arguments to timm.create_model do.
    batch_norm: bool | None = None  # deviation: BatchNorm after every conv (paper: off)
    class_relu: bool | None = None  # the ReLU after the class conv (paper: on)
    drop_input: float | None = None  # dropout on the input (paper: 20 %)
    drop_rate: float | None = None  # dropout after each pool or strided conv (paper: 50 %)
    # data
    dataset: str = "sample"
    data_dir: str | None = None
    preprocess: str = "standardize"  # or "zca": the paper's GCN (scale 55) + ZCA (bias 0.1)
    augment: str = "paper"  # none | paper (flips, translations <= shift px) | strong (+ CutMix/Mixup)
    shift: int = 5  # the translations' reach (px each way); the paper's is 5
    crop: int = 0  # train on random crop x crop windows (px) in the first crop_epochs epochs; 0: off
    crop_epochs: int = 0  # the rest train at full size, so BatchNorm statistics match test images
    flips: str = "random"  # random | alternate: each image flipped in every other epoch (airbench)
    val_fraction: float = 0.0  # held out of train for model selection; 0: evaluate on test
    train_limit: int | None = None  # use at most this many training images (quick runs)
    test_limit: int | None = None
    shuffle_labels: bool = False  # permute the training labels once (with the seed): the data-randomization test
    # optimization (Section 3.2: SGD, momentum 0.9, weight decay 0.001)
    epochs: int = 30
    batch_size: int = 128  # global, over all processes
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.001
    schedule: str = "cosine"  # paper (x gamma at milestones) | cosine | onecycle | constant
    milestones: list[int] = field(default_factory=lambda: [200, 250, 300])  # epochs, for "paper"
    gamma: float = 0.1
    warmup_epochs: float = 1.0  # linear warm-up from lr / 10 before any schedule; a fraction is allowed, 0 for none
    label_smoothing: float = 0.0
    weight_init: str = "xavier-open"  # xavier-open | xavier (Xavier-uniform, biases 0.1) | kaiming | lsuv: see initialization.py
    whiten: str = "off"  # off | init | frozen: the first conv from the training patches' whitening
    dirac: bool = False  # later convs start with identity filters
    decay_all: bool = True  # weight decay on every parameter; False: on conv weights only, not biases or BatchNorm
    bn_momentum: float = 0.1  # weight of each batch in BatchNorm's running statistics (torch's 0.1; airbench's 0.4)
    optimizer: str = "sgd"  # sgd | muon: conv weights take Muon's orthogonalized steps, the rest SGD's (needs batch_norm)
    muon_lr: float = 0.05  # muon: the peak share of a conv's weight norm that one step moves
    muon_momentum: float = 0.6  # muon: its Nesterov momentum (airbench's 0.6)
    bias_lr_scale: float = 1.0  # the biases' (BatchNorm shifts', conv biases') lr is lr x this (airbench's 64)
    init: str | None = None  # start from these weights (run folder or allconv .safetensors); fresh optimizer
    ema_decay: float = 0.0  # 0: off; else weights averaged per step (timm's ModelEmaV3)
    lookahead_decay: float = 0.0  # 0: off; else airbench's lookahead, its per-step decay at the end (0.95)
    tta: str = "none"  # none | flip | flip-shift: test-time augmentation of the last epoch's evaluation
    target: float | None = None  # stop once the evaluated top-1 accuracy (%) reaches this; None: run every epoch
    # machinery
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 where the CPU or GPU computes it natively) | fp32 | bf16 | fp16 (CUDA)
    channels_last: bool = True
    compile: bool = False
    workers: int = 4  # DataLoader workers for streamed ImageFolders
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    preset: str | None = None

    def network_options(self) -> dict:
        """batch_norm, class_relu, drop_input, drop_rate as the model is built: its own, then those given."""
        given = {key: getattr(self, key) for key in MODEL_OPTIONS if getattr(self, key) is not None}
        return {**model_options(self.model), **given}

    def model_kwargs(self, num_classes: int) -> dict:
        return {"num_classes": num_classes, **self.network_options()}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def preset_dir():
    """The presets shipped in the wheel (``allconv_cli/presets``), or the repository's own."""
    bundled = resources.files("allconv_cli") / "presets"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parents[2] / "presets"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in preset_dir().iterdir() if p.name.endswith(".toml"))


def preset_path(name_or_path: str) -> Path:
    """A preset's file: a bundled name (``paper-cifar10``) or a path to a .toml file."""

    path = Path(name_or_path)
    if path.suffix == ".toml" or len(path.parts) > 1:  # a path, not a name: say what is wrong with it
        if not path.is_file():
            raise FileNotFoundError(f"preset file {path} {'is a folder' if path.is_dir() else 'does not exist'}: "
                                    f"give a .toml file or one of the presets {', '.join(list_presets())}")
        return path
    path = preset_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        names = list_presets()
        raise ValueError(f"unknown preset {name_or_path!r}{did_you_mean(name_or_path, names)}; "
                         f"presets: {', '.join(names)} (or a path to a .toml file)")
    return path


def read_preset(name_or_path: str) -> dict:
    """A preset by name or path -> its settings, keys checked (values are checked by ``validate``)."""
    path = preset_path(name_or_path)
    try:
        settings = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"preset {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"preset {path} is not valid TOML: {err}") from None
    check_keys(settings, f"preset {path}")
    return settings


def check_keys(settings: dict, where: str):

    for key in settings:
        if key not in FIELDS or key == "preset":
            raise ValueError(f"unknown key {show_value(key)} in {where}{did_you_mean(str(key), FIELDS)}; "
                             f"valid keys: {', '.join(k for k in FIELDS if k != 'preset')}")


def resolve(preset: str | None = None, **overrides) -> TrainConfig:
    """Defaults, then ``preset``, then ``overrides`` whose value is not None; every value is
    checked before anything is built or written."""
    layers = []  # (where, settings); later layers win
    if preset:
        layers.append((f"preset {preset_path(preset)}", read_preset(preset)))
    given = {k: v for k, v in overrides.items() if v is not None}
    check_keys(given, OPTIONS)
    layers.append((OPTIONS, given))
    settings, origin = {}, {}
    for where, layer in layers:  # each layer whole: a bad preset value is an error even where an option replaces it
        settings.update(check_values(layer, dict.fromkeys(layer, where)))
        origin.update(dict.fromkeys(layer, where))
    config = TrainConfig(**settings, preset=preset)
    validate(config, origin)
    if config.init is not None:  # a new run only: a resumed one restores its own weights, not these

        check_weights_file(config.init)
    # Milestones act only in the paper schedule: given in a layer at or after the one that set
    # another schedule (or with the default one), they would be ignored without a word.
    if "milestones" in origin and config.schedule != "paper":
        rank = {where: i for i, (where, _) in enumerate(layers)}
        if rank[origin["milestones"]] >= rank.get(origin.get("schedule"), -1):
            where = origin["milestones"]
            raise ValueError(f"{where}: {_show('milestones', config.milestones, where)} is given, but only "
                             f"schedule \"paper\" uses milestones and this run's is {config.schedule!r}: "
                             "drop the milestones or choose the paper schedule")
    return config


def from_json(text: str, where: str = "config.json") -> TrainConfig:
    """Settings saved by ``TrainConfig.to_json`` (a run folder's config.json), checked as a preset's
    are; ``where`` names the file in messages."""
    try:
        settings = json.loads(text)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError of bytes given as text
        raise ValueError(f"{where} is not valid JSON ({err}): restore it from the run or start a new run") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{where} holds a JSON {'array' if isinstance(settings, list) else 'value'}, not the "
                         "object of settings that allconv train writes")
    # Keys this version does not know come from another version's run (e.g. the former "amp"):
    # they are dropped, and the missing ones keep their defaults.
    settings = {k: v for k, v in settings.items() if k in FIELDS}
    config = TrainConfig(**settings)
    validate(config, dict.fromkeys(settings, where))
    return config


OPTIONS = "the options"


_TYPES = typing.get_type_hints(TrainConfig)


_WHOLE, _NUMBER = "a whole number", "a finite number"


_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")


# The range of each numeric setting: (test, words after the type's own, e.g. "a whole number ...").
RANGES: dict[str, tuple] = {
    "epochs": (lambda v: v >= 1, "of at least 1"),
    "batch_size": (lambda v: v >= 1, "of at least 1"),
    "eval_every": (lambda v: v >= 1, "of at least 1 (epochs)"),
    "workers": (lambda v: v >= 0, "of at least 0"),
    "crop": (lambda v: v >= 0, "of at least 0 (px; 0 turns crops off)"),
    "crop_epochs": (lambda v: v >= 0, "of at least 0"),
    "shift": (lambda v: v >= 0, "of at least 0 (px; 0 turns translations off)"),
    "train_limit": (lambda v: v >= 1, "of at least 1 (leave it out to use every image)"),
    "test_limit": (lambda v: v >= 1, "of at least 1 (leave it out to use every image)"),
    # torch's generators take 64 bits; the per-epoch and per-step seeds made from this one stay below 2^63
    "seed": (lambda v: 0 <= v < 2**63, "in [0, 2^63)"),
    "lr": (lambda v: v > 0, "above 0"),
    "momentum": _UNIT,
    "weight_decay": (lambda v: v >= 0, "of at least 0"),
    "gamma": (lambda v: v > 0, "above 0"),
    "warmup_epochs": (lambda v: v >= 0, "of at least 0 (epochs)"),
    "label_smoothing": _UNIT,
    "bn_momentum": (lambda v: 0 < v <= 1, "in (0, 1] (the weight of each batch in the running statistics)"),
    "muon_lr": (lambda v: v > 0, "above 0"),
    "muon_momentum": _UNIT,
    "bias_lr_scale": (lambda v: v > 0, "above 0 (1 gives biases the weights' learning rate)"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1) (0 turns EMA off)"),
    "lookahead_decay": (lambda v: 0 <= v < 1, "in [0, 1) (0 turns lookahead off)"),
    "target": (lambda v: 0 < v <= 100, "in (0, 100] (top-1 accuracy, %)"),
    "val_fraction": _UNIT,
    "drop_input": (lambda v: 0 <= v < 1, "in [0, 1) (0 turns that dropout off)"),
    "drop_rate": (lambda v: 0 <= v < 1, "in [0, 1) (0 turns that dropout off)"),
    "milestones": (lambda v: all(m >= 1 for m in v) and v == sorted(set(v)),
                   "of increasing epochs of at least 1, e.g. [200, 250, 300]"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """The settings that name one of a fixed set (the model's registry is checked on its own)."""

    return {"dataset": DATASETS, "augment": AUGMENTATIONS, "preprocess": KINDS, "schedule": SCHEDULES,
            "precision": PRECISIONS, "weight_init": WEIGHT_INITS, "flips": FLIPS, "whiten": WHITEN, "tta": TTA,
            "optimizer": OPTIMIZERS}


def _convert(hint, value):
    """``value`` as a value of the annotation ``hint`` -> (value, None), or (None, what is allowed).

    bool is not taken for a number (TOML's ``epochs = true``); an int is taken for a float."""
    if isinstance(hint, types.UnionType):  # X | None: null in JSON; a preset leaves the key out
        inner = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        return (None, None) if value is None else _convert(inner, value)
    if typing.get_origin(hint) is list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value), None
        return None, "a list of whole numbers"
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "true or false")
    if hint is int:
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else (None, _WHOLE)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value), None
        return None, _NUMBER
    return (value, None) if isinstance(value, str) else (None, "a string")


def _allowed(key: str) -> str:
    hint = _TYPES[key]
    inner = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    kind = {bool: "true or false", int: _WHOLE, float: _NUMBER, str: "a string"}.get(inner, "a list of whole numbers")
    if key in RANGES:
        return f"{kind} {RANGES[key][1]}"
    if key in choices():
        return f"one of {', '.join(choices()[key])}"
    return kind


def check_values(settings: dict, origin: dict[str, str]) -> dict:
    """Each setting's type, range and choice -> the settings, ints converted where floats belong.

    Raises one ValueError listing every problem, each naming where the value came from
    (``origin[key]``, "the defaults" when absent), the key, the value and what is allowed."""

    values, problems = {}, []
    allowed_names = choices()
    for key, value in settings.items():
        converted, wrong = _convert(_TYPES[key], value)
        hint = ""
        if wrong is None and converted is not None:
            if key in RANGES and not RANGES[key][0](converted):
                wrong = "out of range"
            elif key in allowed_names and converted not in allowed_names[key]:
                wrong, hint = "not a choice", did_you_mean(converted, allowed_names[key])
            elif key == "model":
                try:
                    resolve_name(converted)
                except ValueError:
                    wrong, hint = "not a model", did_you_mean(converted.replace("_", "-"), list_models())
        if wrong is None:
            values[key] = converted
            continue
        where = origin.get(key, "the defaults")
        allowed = "a registered model name, e.g. all-cnn-c (see 'allconv models')" if key == "model" else _allowed(key)
        problems.append(f"{where}: {_show(key, value, where)} is not allowed{hint}; "
                        f"{_flag(key, where)} takes {allowed}")
    if problems:
        raise ValueError("; ".join(problems))
    return values


def validate(config: TrainConfig, origin: dict[str, str] | None = None):
    """Check every setting (converting ints where floats belong, in place), then the rules
    between settings. ``origin`` says where each given key came from, for the messages."""
    origin = origin or {}
    for key, value in check_values(dataclasses.asdict(config), origin).items():
        setattr(config, key, value)

    def where(*keys) -> str:
        return ", ".join(sorted({origin[k] for k in keys if k in origin} or {"the defaults"}))

    if not config.crop_epochs <= config.epochs or (config.crop > 0) != (config.crop_epochs > 0):
        raise ValueError(f"{where('crop', 'crop_epochs', 'epochs')}: crop {config.crop} px for crop_epochs "
                         f"{config.crop_epochs}: give both, a crop side smaller than the input and at most "
                         f"epochs ({config.epochs}) epochs, or neither")


    name = resolve_name(config.model)
    _, height, width = get_pretrained_cfg_value(name, "input_size")  # the registry's, as training uses
    for key in ("crop", "shift"):  # a reflected border reaches at most side - 1 px
        if getattr(config, key) >= min(height, width):
            raise ValueError(f"{where(key, 'model')}: {key} {getattr(config, key)} px is not smaller than "
                             f"{name}'s {height}x{width} input: give a smaller {_flag(key, origin.get(key, OPTIONS))}")
    if config.nesterov and config.momentum == 0:
        raise ValueError(f"{where('nesterov', 'momentum')}: nesterov needs a momentum above 0: "
                         "give a momentum or turn nesterov off")
    if config.optimizer == "muon" and not config.network_options()["batch_norm"]:
        raise ValueError(f"{where('optimizer', 'batch_norm')}: optimizer muon needs batch_norm: it rescales every "
                         "conv's weights, which only a BatchNorm after the conv makes harmless; "
                         "turn batch_norm on or use optimizer sgd")

    try:
        check_source(config.dataset, config.data_dir)
        if config.dataset == "imagefolder" and config.data_dir is not None:
            check_folder(config.data_dir)  # the folder's layout, before a run folder is made for it
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{where('dataset', 'data_dir')}: {err}") from None


def _show(key: str, value, where: str) -> str:
    """How the user wrote ``key``: ``epochs = 1.5`` in a file, ``--epochs 1.5`` on the command line."""
    if where == OPTIONS:
        if isinstance(value, bool):
            return f"--{'' if value else 'no-'}{key.replace('_', '-')}"
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        return f"{_flag(key, where)} {show_value(shown, quote=False)}"
    return f"{key} = {show_value(value)}"


def _flag(key: str, where: str) -> str:
    return f"--{key.replace('_', '-')}" if where == OPTIONS else key
