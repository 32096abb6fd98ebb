"""Training settings in three layers: dataclass defaults, a preset (flat TOML in ``presets/``),
then the options given on the command line. ``None`` means "not given" at every layer.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

SCHEDULES = ("paper", "cosine", "onecycle", "constant")


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults train the faithful All-CNN-C on the
    bundled sample with the paper's optimizer and a cosine schedule."""

    # what to train
    model: str = "all-cnn-c"
    batch_norm: bool = False  # deviation: BatchNorm after every conv
    class_relu: bool = True  # the paper's ReLU after the class conv
    drop_input: float | None = None  # dropout on the input; None: the model's own (20 %, the paper's)
    drop_rate: float | None = None  # dropout after each pool or strided conv; None: the model's own (50 %)
    # data
    dataset: str = "sample"
    data_dir: str | None = None
    preprocess: str = "standardize"  # or "zca": the paper's GCN (scale 55) + ZCA (bias 0.1)
    augment: str = "paper"  # none | paper (flips, translations <= 5 px) | strong (+ CutMix/Mixup)
    crop: int = 0  # train on random crop x crop windows (px) in the first crop_epochs epochs; 0: off
    crop_epochs: int = 0  # the rest train at full size, so BatchNorm statistics match test images
    val_fraction: float = 0.0  # held out of train for model selection; 0: evaluate on test
    train_limit: int | None = None  # use at most this many training images (quick runs)
    test_limit: int | None = None
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
    warmup_epochs: float = 1.0  # linear warm-up from lr / 10 (cosine); a fraction is allowed
    label_smoothing: float = 0.0
    init: str | None = None  # start from these weights (run folder or allconv .safetensors); fresh optimizer
    ema_decay: float = 0.0  # 0: off; else weights averaged per step (timm's ModelEmaV3)
    # machinery
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    channels_last: bool = True
    compile: bool = False
    workers: int = 4  # DataLoader workers for streamed ImageFolders
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    preset: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def preset_dir():
    """The presets shipped in the wheel (``allconv_cli/presets``), or the repository's own."""
    bundled = resources.files("allconv_cli") / "presets"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parents[1] / "presets"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in preset_dir().iterdir() if p.name.endswith(".toml"))


def read_preset(name_or_path: str) -> dict:
    """A preset by name (``paper-cifar10``) or a path to a TOML file -> its settings."""
    from allconv_cli.models import did_you_mean

    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = preset_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            names = list_presets()
            raise ValueError(f"unknown preset {name_or_path!r}{did_you_mean(name_or_path, names)}; "
                             f"presets: {', '.join(names)} (or a path to a .toml file)")
    try:
        settings = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"preset {path} is not valid TOML: {err}") from None
    check_keys(settings, f"preset {path.name}")
    return settings


def check_keys(settings: dict, where: str):
    from allconv_cli.models import did_you_mean

    for key in settings:
        if key not in FIELDS or key == "preset":
            raise ValueError(f"unknown key {key!r} in {where}{did_you_mean(key, FIELDS)}; "
                             f"valid keys: {', '.join(k for k in FIELDS if k != 'preset')}")


def resolve(preset: str | None = None, **overrides) -> TrainConfig:
    """Defaults, then ``preset``, then ``overrides`` whose value is not None."""
    settings = read_preset(preset) if preset else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    check_keys(given, "the options")
    settings.update(given)
    config = TrainConfig(**settings, preset=preset)
    validate(config)
    return config


def from_json(text: str) -> TrainConfig:
    settings = json.loads(text)
    return TrainConfig(**{k: v for k, v in settings.items() if k in FIELDS})


def validate(config: TrainConfig):
    """Range and choice checks, each naming the setting and the fix."""
    from allconv_cli.datasets import AUGMENTATIONS, DATASETS
    from allconv_cli.models import did_you_mean, resolve_name
    from allconv_cli.preprocess import KINDS

    resolve_name(config.model)
    for key, choices in (("dataset", DATASETS), ("augment", AUGMENTATIONS), ("preprocess", KINDS),
                         ("schedule", SCHEDULES)):
        value = getattr(config, key)
        if value not in choices:
            raise ValueError(f"unknown {key} {value!r}{did_you_mean(value, choices)}; use one of {', '.join(choices)}")
    for key in ("epochs", "batch_size", "eval_every"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.crop < 0 or not 0 <= config.crop_epochs <= config.epochs or (config.crop > 0) != (config.crop_epochs > 0):
        raise ValueError(f"crop {config.crop} px for crop_epochs {config.crop_epochs}: give both, a crop side "
                         f"smaller than the input and at most epochs ({config.epochs}) epochs, or neither")
    if config.lr <= 0:
        raise ValueError(f"lr must be positive, got {config.lr}")
    if not 0 <= config.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    for key in ("drop_input", "drop_rate"):
        value = getattr(config, key)
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"{key} must be in [0, 1) (0 turns that dropout off), got {value}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (0 turns EMA off), got {config.ema_decay}")
