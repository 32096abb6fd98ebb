"""Safe files: atomic writes, and safetensors weights that carry what rebuilds the model.

A weights file holds the model's state dict under its own keys, the preprocessing tensors
under ``preprocess.*`` (e.g. a ZCA matrix), and one metadata entry ``allconv``: a JSON object
with ``model`` (registry name), ``model_kwargs``, ``classes``, ``input_size``, ``preprocess``
(its non-tensor settings), ``dataset``, ``epoch``, ``metrics`` and ``versions``. Nothing is
ever unpickled: weights are safetensors; training state loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from allconv_cli import __version__

WEIGHTS_NAME = "model.safetensors"
PREPROCESS_PREFIX = "preprocess."
FORMAT_VERSION = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name in ``path``'s folder, then rename it to ``path``.

    A crash or a full disk at any instant leaves the old ``path`` (if any) untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


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
    """Read a weights file -> (model state dict, meta, preprocess tensors)."""
    path = resolve_weights(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({err}); "
                         "it may be truncated or not written by allconv") from None
    if "allconv" not in header:
        raise ValueError(f"{path} is a safetensors file without allconv metadata; "
                         "export it from an allconv run, or load it with --model NAME")
    meta = json.loads(header["allconv"])
    state = {k: v for k, v in tensors.items() if not k.startswith(PREPROCESS_PREFIX)}
    preprocess = {k[len(PREPROCESS_PREFIX):]: v for k, v in tensors.items()
                  if k.startswith(PREPROCESS_PREFIX)}
    return state, meta, preprocess


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
    """Rebuild the model a weights file describes -> (model in eval mode, meta, preprocess)."""
    from allconv_cli.models import create_model

    state, meta, preprocess = load_weights(path)
    model = create_model(meta["model"], **meta.get("model_kwargs", {}))
    load_state(model, state, f"{path} does not fit {meta['model']} with {meta.get('model_kwargs')}")
    return model.to(device).eval(), meta, preprocess


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], mismatch: str):
    """Load ``state`` into ``model``, floats cast to the model's dtype (fp16 files load into fp32
    models); a key or shape mismatch raises ValueError starting with ``mismatch``."""
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"{mismatch}: {first}") from None
