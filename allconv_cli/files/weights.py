"""Safetensors weights that carry what rebuilds the model.

A weights file holds the model's state dict under its own keys, the preprocessing tensors
under ``preprocess.*`` (e.g. a ZCA matrix), and one metadata entry ``allconv``: a JSON object
with ``model`` (registry name), ``model_kwargs``, ``classes``, ``input_size``, ``preprocess``
(its non-tensor settings), ``dataset``, ``epoch``, ``metrics`` and ``versions``. Nothing is
ever unpickled: weights are safetensors; training state loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from allconv_cli import __version__
from allconv_cli.choices import AUGMENTATIONS
from allconv_cli.data.sources import DATA_SOURCES
from allconv_cli.data.preprocess import KINDS
from allconv_cli.models.registry import create_model, list_models
from allconv_cli.util import atomic_write, show_value

WEIGHTS_NAME = "model.safetensors"


PREPROCESS_PREFIX = "preprocess."


FORMAT_VERSION = 1


def resolve_weights(path: str | Path) -> Path:
    """A run folder or a ``.safetensors`` file -> the weights file; raises with the fix."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: give a run folder (with "
                                f"{WEIGHTS_NAME}) or a .safetensors file written by allconv")
    return path


def save_weights(
    path: str | Path,
    model: torch.nn.Module,
    meta: dict,
    preprocess: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s weights, ``preprocess`` tensors and ``meta`` atomically.

    ``dtype`` (e.g. torch.float16) casts floating-point weights for a smaller file; integer
    buffers (BatchNorm's counter) keep theirs.
    """
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    for key, value in (preprocess or {}).items():
        tensors[PREPROCESS_PREFIX + key] = value.detach().cpu().contiguous()
    meta = {
        "format": FORMAT_VERSION,
        **meta,
        "versions": {"allconv": __version__, "torch": torch.__version__},
    }
    header = {"allconv": json.dumps(meta), "format": "pt"}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """Read and check a weights file -> (model state dict, meta, preprocess tensors).

    The header is checked first (``check_weights_file``), then the weights are refused if not
    finite. Each problem is one ValueError naming the file."""
    path = resolve_weights(path)
    meta = _read_header(path)
    try:
        tensors = load_file(str(path))  # now memory is taken: the size of the tensors checked above
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    for key, tensor in tensors.items():
        _check_finite(f"{path}: {key}", tensor)
    state = {k: v for k, v in tensors.items() if not k.startswith(PREPROCESS_PREFIX)}
    preprocess = {k[len(PREPROCESS_PREFIX):]: v for k, v in tensors.items()
                  if k.startswith(PREPROCESS_PREFIX)}
    return state, meta, preprocess


def check_weights_file(path: str | Path) -> dict:
    """Check a weights file without reading its tensors -> its metadata: the metadata against its
    schema; the tensor names, shapes and kinds (integer or floating point) against the model it
    describes, built on the meta device."""
    return _read_header(resolve_weights(path))


def _read_header(path: Path) -> dict:
    """The checked metadata of ``path``, from its header alone."""

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: tuple(view.get_shape()) for key, view in tensors.items()}
            dtypes = {key: view.get_dtype() for key, view in tensors.items()}  # e.g. F32, BF16, I64, BOOL
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    if "allconv" not in header:
        raise ValueError(f"{path} is a safetensors file without allconv metadata; "
                         "export it from an allconv run, or load it with --model NAME")
    meta = read_meta(header["allconv"], path)
    model = _check_shapes(path, meta, shapes)
    floating = {**{key: value.is_floating_point() for key, value in model.state_dict().items()},
                **{key: True for key in shapes if key.startswith(PREPROCESS_PREFIX)}}
    for key, dtype in dtypes.items():
        if dtype.startswith(("F", "BF")) != floating[key]:
            raise ValueError(f"{path}: {key} holds {dtype} values where the model has "
                             f"{'floating-point' if floating[key] else 'integer'} ones: the file is damaged "
                             "or not allconv's")
    return meta


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors checkpoint ({err}); "
                      "it may be truncated or not written by allconv")


def average_weights(paths: list[str | Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean (fp32) of several weights files of one model, BatchNorm statistics
    included, as timm's avg_checkpoints: e.g. the ends of successive training cycles. Integer
    buffers (BatchNorm's counter) come from the first file. Options that hold no weights (dropout
    rates) may differ. Raises ValueError naming the first file whose model, keys, shapes or
    preprocessing differ from the first one's."""
    first, meta, preprocess = load_weights(paths[0])
    total = {key: value.double() if value.is_floating_point() else value for key, value in first.items()}
    for path in paths[1:]:
        state, other, other_preprocess = load_weights(path)
        same = (other["model"], other["preprocess"]) == (meta["model"], meta["preprocess"])
        same = same and state.keys() == first.keys() and all(state[k].shape == first[k].shape for k in first)
        same = same and other_preprocess.keys() == preprocess.keys() and all(
            torch.equal(other_preprocess[k], preprocess[k]) for k in preprocess)
        if not same:
            raise ValueError(f"{path} is not the model of {paths[0]} (model, tensor names, shapes or "
                             "preprocessing differ): average only weights of one model and data set")
        for key, value in state.items():
            if value.is_floating_point():
                total[key] += value.double()
    return {key: (value / len(paths)).float() if value.is_floating_point() else value
            for key, value in total.items()}


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model a weights file describes -> (model in eval mode, meta, preprocess);
    the file is checked whole (``load_weights``) before the model takes any memory."""

    state, meta, preprocess = load_weights(path)
    model = create_model(meta["model"], **meta.get("model_kwargs", {}))
    load_state(model, state, f"{path} does not fit {meta['model'].replace('_', '-')} with {meta.get('model_kwargs')}")
    return model.to(device).eval(), meta, preprocess


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], mismatch: str):
    """Load ``state`` into ``model``, floats cast to the model's dtype (fp16 files load into fp32
    models); a key or shape mismatch, integers where the model has floats (or the reverse) and
    NaN or inf raise ValueError starting with ``mismatch``."""
    dtype = next(model.parameters()).dtype
    own = model.state_dict()
    for key, value in state.items():  # allconv files were checked on load; plain state dicts were not
        if key in own and value.is_floating_point() != own[key].is_floating_point():
            raise ValueError(f"{mismatch}: {key} holds {str(value.dtype).removeprefix('torch.')} values where "
                             f"the model has {str(own[key].dtype).removeprefix('torch.')} ones")
        _check_finite(f"{mismatch}: {key}", value)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"{mismatch}: {first}") from None


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _unit(value) -> bool:
    return _number(value) and 0 <= value < 1


# Inputs of at most this many values (C x H x W): visualize and export build batches of them,
# 64 MiB of float32 per image.
MAX_INPUT_VALUES = 2**24


# AllConvNet's options as a checkpoint may set them (a test keeps this in step with its signature).
MODEL_KWARGS: dict[str, tuple[Callable, str]] = {
    "num_classes": (lambda v: _whole(v) and 1 <= v < 2**31, "a whole number in [1, 2^31)"),
    "in_chans": (lambda v: _whole(v) and 1 <= v <= MAX_INPUT_VALUES, "a whole number of at least 1"),
    "batch_norm": (lambda v: isinstance(v, bool), "true or false"),
    "class_relu": (lambda v: isinstance(v, bool), "true or false"),
    "drop_input": (_unit, "a number in [0, 1)"),
    "drop_rate": (_unit, "a number in [0, 1)"),
    # timm's pool option; "" (unpooled maps) would not give the class scores a checkpoint is for
    "global_pool": (lambda v: v == "avg", '"avg"'),
}


def _meta_schema() -> dict[str, tuple[bool, Callable, str]]:
    """key -> (required, test, what is allowed). Keys not listed (trained_on, recipe, init_from,
    ...) only describe the file and are kept as they are."""

    models = set(list_models()) | {name.replace("-", "_") for name in list_models()}
    return {
        "format": (False, lambda v: _whole(v) and 1 <= v <= FORMAT_VERSION,
                   f"a format version this allconv reads (1 to {FORMAT_VERSION}; a newer allconv wrote a higher one)"),
        "model": (True, lambda v: isinstance(v, str) and v in models, "a registered model name (see 'allconv models')"),
        "model_kwargs": (False, lambda v: isinstance(v, dict),
                         f"an object of model options ({', '.join(MODEL_KWARGS)})"),
        "classes": (True, lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
                    "a list of class names"),
        "input_size": (True, lambda v: isinstance(v, list) and len(v) == 3 and all(_whole(n) and n >= 1 for n in v)
                       and math.prod(v) <= MAX_INPUT_VALUES,
                       f"[channels, height, width], whole numbers of at least 1, at most {MAX_INPUT_VALUES:,} values"),
        "preprocess": (True, lambda v: isinstance(v, dict) and v.get("kind") in KINDS,
                       f"an object whose kind is one of {', '.join(KINDS)}"),
        "dataset": (False, lambda v: v is None or v in DATA_SOURCES, f"null or one of {', '.join(DATA_SOURCES)}"),
        "data_dir": (False, lambda v: v is None or isinstance(v, str), "null or a folder"),
        "augment": (False, lambda v: v in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}"),
        "epoch": (False, lambda v: v is None or (_whole(v) and v >= 0), "null or a whole number of at least 0"),
        "metrics": (False, lambda v: isinstance(v, dict), "an object"),
        "paper_error": (False, lambda v: v is None or _number(v), "null or a number"),
        "versions": (False, lambda v: isinstance(v, dict), "an object"),
    }


def read_meta(text: str, path: str | Path) -> dict:
    """The ``allconv`` metadata entry of ``path`` -> its dict, checked against the schema: one
    ValueError naming the file, the key, the value and what is allowed."""

    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: its allconv metadata is not JSON ({type(err).__name__}: {str(err)[:80]}); "
                         "the file is damaged or was not written by allconv") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its allconv metadata is a JSON {_json_kind(meta)}, not the object "
                         "allconv writes (model, model_kwargs, classes, input_size, preprocess, ...)")

    def refuse(key: str, value, allowed: str):
        raise ValueError(f"{path}: allconv metadata {key} = {show_value(value)} is not allowed; "
                         f"{key.rsplit('.', 1)[-1]} takes {allowed}")

    for key, (required, test, allowed) in _meta_schema().items():
        if key not in meta:
            if required:
                raise ValueError(f"{path}: its allconv metadata has no {key!r} ({allowed}); save the "
                                 "checkpoint again with allconv (allconv train writes it)")
        elif not test(meta[key]):
            refuse(key, meta[key], allowed)
    for key, value in meta.get("model_kwargs", {}).items():
        if key not in MODEL_KWARGS:
            raise ValueError(f"{path}: allconv metadata model_kwargs has an unknown option {show_value(key)}; "
                             f"the models take {', '.join(MODEL_KWARGS)}")
        if not MODEL_KWARGS[key][0](value):
            refuse(f"model_kwargs.{key}", value, MODEL_KWARGS[key][1])
    preprocess, channels = meta["preprocess"], meta["input_size"][0]
    if preprocess["kind"] == "standardize":
        for key, allowed in (("mean", "finite numbers"), ("std", "numbers above 0")):
            value = preprocess.get(key)
            if not (isinstance(value, list) and len(value) == channels and all(_number(v) for v in value)
                    and (key == "mean" or all(v > 0 for v in value))):
                refuse(f"preprocess.{key}", value, f"a list of {channels} {allowed}, one per input channel")
    else:
        for key, test, allowed in (("gcn_scale", lambda v: _number(v) and v > 0, "a number above 0"),
                                   ("zca_bias", lambda v: _number(v) and v >= 0, "a number of at least 0")):
            if not test(preprocess.get(key)):
                refuse(f"preprocess.{key}", preprocess.get(key), allowed)
    return meta


def _json_kind(value) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def _check_shapes(path: Path, meta: dict, shapes: dict[str, tuple]) -> torch.nn.Module:
    """Build the model ``meta`` describes on the meta device (no memory) and compare it with the
    file's tensor names and shapes -> that meta-device model."""

    kwargs = meta.get("model_kwargs", {})
    with torch.device("meta"):
        model = create_model(meta["model"], **kwargs)
    described = f"{path} does not fit {meta['model'].replace('_', '-')} with {kwargs}"
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: shape for key, shape in shapes.items() if not key.startswith(PREPROCESS_PREFIX)}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{described}: " + "; ".join(
            f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    for key, shape in expected.items():
        if found[key] != shape:
            raise ValueError(f"{described}: {key} is {list(found[key])} in the file, {list(shape)} in the model")
    if len(meta["classes"]) != model.num_classes:
        raise ValueError(f"{path}: its allconv metadata names {len(meta['classes'])} classes for a model of "
                         f"{model.num_classes}: the metadata and the weights disagree")
    channels, height, width = meta["input_size"]
    if channels != model.in_chans:
        raise ValueError(f"{path}: its allconv metadata says input_size {meta['input_size']} for a model of "
                         f"{model.in_chans} input channels")
    try:
        model(torch.empty(1, channels, height, width, device="meta"))
    except RuntimeError:
        raise ValueError(f"{path}: input_size {meta['input_size']} is too small for {meta['model']}") from None
    dims = channels * height * width
    wanted = {"standardize": {}, "zca": {"zca_mean": (dims,), "zca_matrix": (dims, dims)}}[meta["preprocess"]["kind"]]
    given = {key[len(PREPROCESS_PREFIX):]: shape for key, shape in shapes.items() if key.startswith(PREPROCESS_PREFIX)}
    if given != wanted:
        raise ValueError(f"{path}: {meta['preprocess']['kind']} preprocessing of {meta['input_size']} inputs needs "
                         f"the tensors {wanted or 'none'}, the file holds {given or 'none'}")
    return model


def _check_finite(where: str, tensor: torch.Tensor):
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{where} holds NaN or infinite values: the weights are damaged (or their training "
                         "diverged); use another checkpoint")
