"""Training settings in three layers: the defaults (``config.TrainConfig``), a preset (flat TOML in
``presets/``), then the options given on the command line. ``None`` means "not given" at every
layer. Every value is checked against its setting's type, range and choices, then the rules
between settings and the facts they name (the model, the data, the weights of ``init``)."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from pathlib import Path

from timm.models import get_pretrained_cfg_value

from allconv_cli import __version__
from allconv_cli.data.datasets import check_source
from allconv_cli.files.weights import check_weights_file
from allconv_cli.models.registry import MODEL_OPTIONS, NETWORKS, list_models, model_options, resolve_name
from allconv_cli.train.config import (
    DEFAULTS_KEY,
    DEFAULTS_VERSION,
    EARLIER_DEFAULTS,
    FIELDS,
    NUMBER,
    TYPES,
    WHOLE,
    WRITER_KEY,
    TrainConfig,
    allowed,
    kind,
    list_presets,
    preset_dir,
)
from allconv_cli.train.fields import NOT_STATED
from allconv_cli.train.optimizers import OPTIMIZERS
from allconv_cli.util import did_you_mean, read_text, show_value


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
        settings = tomllib.loads(read_text(path))
    except UnicodeDecodeError as err:
        raise ValueError(f"preset {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"preset {path} is not valid TOML: {err}") from None
    check_keys(settings, f"preset {path}")
    return settings


SETTINGS = [key for key in FIELDS if key != "preset"]  # what a preset, an option or --grid may set


def check_keys(settings: dict, where: str):

    for key in settings:
        if key == "preset":  # a setting of the command line only: a preset is one layer, not a chain
            raise ValueError(f"{where} names a preset (preset = {show_value(settings[key])}): a preset cannot name "
                             "another: copy that preset's keys into this file")
        if key not in FIELDS:
            raise ValueError(f"unknown key {show_value(key)} in {where}{did_you_mean(str(key), SETTINGS)}; "
                             f"valid keys: {', '.join(SETTINGS)}")


def resolve(preset: str | None = None, **overrides) -> TrainConfig:
    """Defaults, then ``preset``, then ``overrides`` whose value is not None; every value is
    checked before anything is built or written."""
    layers = []  # (where, settings); later layers win
    if preset:
        layers.append((f"preset {preset_path(preset)}", read_preset(preset)))
    given = {k: v for k, v in overrides.items() if v is not None}
    check_keys(given, OPTIONS)
    layers.append((OPTIONS, given))
    settings, origin, stated = {}, {}, []
    for where, layer in layers:  # each layer whole: a bad preset value is an error even where an option replaces it
        stated.append(check_values(layer, dict.fromkeys(layer, where)))
        settings.update(stated[-1])
        origin.update(dict.fromkeys(layer, where))
    config = TrainConfig(**{**settings, **network_options(stated)}, preset=preset)
    validate(config, origin)
    if config.init is not None:  # a new run only: a resumed one restores its own weights, not these

        check_weights_file(config.init)
    check_in_effect(config, origin, [where for where, _ in layers])
    return config


# Settings that act only under another's value: setting -> (that setting, the value it needs).
IN_EFFECT_ONLY = {"milestones": ("schedule", "paper"),
                  **{key: ("optimizer", name) for name, info in OPTIMIZERS.items() for key in info.settings}}


def check_in_effect(config: TrainConfig, origin: dict[str, str], layers: list[str]):
    """Refuse a given setting that would be ignored without a word (Muon's own settings with
    optimizer sgd, milestones with another schedule): one given in a layer at or after the one
    that chose otherwise (or with the default). ``layers``: the wheres of ``origin``, later wins."""
    rank = {where: i for i, where in enumerate(layers)}
    for key, (ruler, needed) in IN_EFFECT_ONLY.items():
        if key not in origin or getattr(config, ruler) == needed:
            continue
        if rank.get(origin[key], -1) >= rank.get(origin.get(ruler), -1):
            where = origin[key]
            raise ValueError(f"{where}: {_show(key, getattr(config, key), where)} is given, but only {ruler} "
                             f"\"{needed}\" uses {key} and this run's is {getattr(config, ruler)!r}: drop {key} "
                             f"or give {_show(ruler, needed, where)}")


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
    # they are dropped, and the missing ones keep the defaults the file was written under.
    version = _defaults_version(settings, where)
    earlier = read_preset(EARLIER_DEFAULTS[version]) if version in EARLIER_DEFAULTS else {}
    # a null network option was not stated: the model's row or the defaults' gives it
    saved = {k: v for k, v in settings.items() if k in FIELDS and not (k in MODEL_OPTIONS and v is None)}
    layers = [earlier, check_values(saved, dict.fromkeys(saved, where))]
    config = TrainConfig(**{**earlier, **layers[1], **network_options(layers)})
    validate(config, dict.fromkeys(saved, where))
    return config


def _defaults_version(settings: dict, where: str) -> int:
    """The version of the defaults saved settings were written under: 1 where they do not say
    (written before versions were recorded); one this allconv does not know is refused."""
    version = settings.get(DEFAULTS_KEY, 1)
    known = sorted([*EARLIER_DEFAULTS, DEFAULTS_VERSION])
    if type(version) is not int or version not in known:  # not bool (true == 1), nor 1.0
        writer = settings.get(WRITER_KEY)
        wrote = f"allconv {show_value(writer, quote=False)}" if writer is not None else "another allconv"
        raise ValueError(f"{where} was written by {wrote} under defaults version {show_value(version)}, which this "
                         f"allconv ({__version__}) does not know (it reads {' and '.join(map(str, known))}): resume "
                         "it with the allconv that wrote it, or start a new run")
    return version


OPTIONS = "the options"






# The range of each numeric setting: (test, words after the type's own, e.g. "a whole number ...").
RANGES = {name: f.metadata["check"] for name, f in FIELDS.items() if f.metadata["check"] is not None}
# The settings that name one of a fixed set (the model's registry is checked on its own).
CHOICES = {name: f.metadata["choices"] for name, f in FIELDS.items() if f.metadata["choices"] is not None}


def _convert(key: str, value):
    """``value`` as a value of setting ``key`` -> (value, None), or (None, what is allowed).

    bool is not taken for a number (TOML's ``epochs = true``); an int is taken for a float."""
    hint = kind(key)
    if value is None and hint is not TYPES[key]:  # X | None: null in JSON; a preset leaves the key out
        return None, None
    if typing.get_origin(hint) is list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value), None
        return None, "a list of whole numbers"
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "true or false")
    if hint is int:
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else (None, WHOLE)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value), None
        return None, NUMBER
    return (value, None) if isinstance(value, str) else (None, "a string")



TRUE, FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def parse_setting(key: str, text: str, where: str):
    """A setting's value written as text (``--grid``'s values) -> the value, checked as an option's:
    a bool as true/false (on/off), a list of whole numbers as 200:250:300."""
    if key not in FIELDS or key == "preset":
        raise ValueError(f"unknown setting {show_value(key)} in {where}{did_you_mean(key, SETTINGS)}")
    inner = kind(key)
    value: object = text
    try:
        if typing.get_origin(inner) is list:
            value = [int(v) for v in text.split(":")]
        elif inner is bool and text.lower() in TRUE + FALSE:
            value = text.lower() in TRUE
        elif inner is int:
            value = int(text)
        elif inner is float:
            value = float(text)
    except ValueError:
        pass  # left as text: check_values names what the setting takes
    return check_values({key: value}, {key: where})[key]


def check_values(settings: dict, origin: dict[str, str]) -> dict:
    """Each setting's type, range and choice -> the settings, ints converted where floats belong.

    Raises one ValueError listing every problem, each naming where the value came from
    (``origin[key]``, "the defaults" when absent), the key, the value and what is allowed."""

    values, problems = {}, []
    for key, value in settings.items():
        converted, wrong = _convert(key, value)
        hint = ""
        if wrong is None and converted is not None:
            if key in RANGES and not RANGES[key][0](converted):
                wrong = "out of range"
            elif key in CHOICES and converted not in CHOICES[key]:
                wrong, hint = "not a choice", did_you_mean(converted, CHOICES[key])
            elif key == "model":
                try:  # normalized here, once: every message and file says all-cnn-c as users type it
                    converted = resolve_name(converted).replace("_", "-")
                except ValueError:
                    wrong, hint = "not a model", did_you_mean(converted.replace("_", "-"), list_models())
        if wrong is None:
            values[key] = converted
            continue
        where = origin.get(key, "the defaults")
        takes = "a registered model name, e.g. all-cnn-c (see 'allconv models')" if key == "model" else allowed(key)
        problems.append(f"{where}: {_show(key, value, where)} is not allowed{hint}; "
                        f"{_flag(key, where)} takes {takes}")
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
                             f"{config.model}'s {height}x{width} input: give a smaller {_flag(key, origin.get(key, OPTIONS))}")
    if config.nesterov and config.momentum == 0:
        raise ValueError(f"{where('nesterov', 'momentum')}: nesterov needs a momentum above 0: "
                         "give a momentum or turn nesterov off")
    needs = OPTIMIZERS[config.optimizer].needs_batch_norm
    if needs and not config.batch_norm:
        raise ValueError(f"{where('optimizer', 'batch_norm')}: optimizer {config.optimizer} needs batch_norm: {needs}; "
                         "turn batch_norm on or use optimizer sgd")

    try:
        checker = check_source(config.dataset, config.data_dir).checker()
        if checker is not None and config.data_dir is not None:
            checker(config.data_dir)  # the folder's layout, before a run folder is made for it
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


def network_options(layers: list[dict]) -> dict:
    """batch_norm, class_relu, drop_input and drop_rate as the run builds its network, from its
    layers of settings, lowest first (a preset, then the options given): each option is the last
    layer's that states it, where a layer that names a model states that row's own options below
    its own keys, and the recipe's (TrainConfig's defaults) where no layer states one."""
    options = {key: FIELDS[key].default for key in MODEL_OPTIONS}
    for layer in [{"model": FIELDS["model"].default}, *layers]:
        if "model" in layer:
            options.update(NETWORKS[resolve_name(layer["model"])].options)
        options.update({key: layer[key] for key in MODEL_OPTIONS if layer.get(key) is not None})
    return options


def model_network(preset: str | None, given: dict, model: str) -> dict:
    """The network options ``model`` builds under ``preset`` and the options ``given`` (one of an
    ablation's models, given as if by --model), in ``network_options``' order."""
    layers = [read_preset(preset)] if preset else []
    return network_options([*layers, {**given, "model": model}])


def deviations(config: TrainConfig) -> list[str]:
    """Where ``config``'s recipe departs from the paper's (Section 3.2 and the network's own
    options), each as the option that sets it and the paper's value: ["--preprocess standardize
    (paper: zca)", ...]. Settings the paper leaves open (batch size, initialization, epochs) are
    not deviations."""
    paper = {**model_options(config.model, paper=True), **{name: field.metadata["paper"] for name, field in FIELDS.items()
                                                      if field.metadata["paper"] is not NOT_STATED}}
    current = dataclasses.asdict(config)
    found = []
    for name, papers in paper.items():  # a tuple: any of the values the paper allows
        value = current[name]
        if value in papers if isinstance(papers, tuple) else value == papers:
            continue
        flags = FIELDS[name].metadata["flags"]
        if isinstance(value, bool) and flags:  # a pair of its own names: --decay-weights-only (paper: --decay-all)
            option, shown = (flags[0].split("/")[0 if v else 1] for v in (value, papers))
        else:
            option = _show(name, value, OPTIONS)
            shown = " or ".join(map(str, papers)) if isinstance(papers, tuple) else _paper_value(papers)
        found.append(f"{option} (paper: {shown})")
    return found


def _paper_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def model_kwargs(config: TrainConfig, num_classes: int) -> dict:
    """The keyword arguments that build the run's model."""
    return {"num_classes": num_classes, **{key: getattr(config, key) for key in MODEL_OPTIONS}}
