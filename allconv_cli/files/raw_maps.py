"""The raw-maps file that ``allconv visualize --raw`` writes: the maps beside what they explain,
as safetensors, with one writer and one reader (``write_raw_maps``, ``read_raw_maps``).

Tensors: ``maps.<method>`` for every method, and the tensors of the file's kind. Metadata
``allconv``: a JSON object with ``format``, ``kind`` and ``methods``, then the kind's own fields.
Kinds: ``saliency`` (images: ``image`` and ``input`` (N, C, H, W), ``targets`` (N, 4) rows of
(image, channel or class, y, x)) and ``patches`` (a data set's top patches per filter: ``values``,
``indices``, ``labels``, ``positions``, ``patches``, ``channels``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from allconv_cli.util import atomic_write

RAW_FORMAT = 1
KIND_TENSORS = {"saliency": ("image", "input", "targets"),
                "patches": ("values", "indices", "labels", "positions", "patches", "channels")}
MAPS_PREFIX = "maps."


@dataclass
class RawMaps:
    kind: str  # a key of KIND_TENSORS
    maps: dict[str, torch.Tensor]  # method -> its maps
    tensors: dict[str, torch.Tensor]  # the kind's tensors
    meta: dict  # format, kind, methods and the kind's own fields


def write_raw_maps(path: str | Path, kind: str, maps: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                   meta: dict) -> Path:
    """Write ``maps`` and the kind's ``tensors`` (all of KIND_TENSORS[kind]) with ``meta``, atomically."""
    if set(tensors) != set(KIND_TENSORS[kind]):
        raise ValueError(f"a {kind} raw-maps file holds {', '.join(KIND_TENSORS[kind])}, not {', '.join(tensors)}")
    header = {"format": RAW_FORMAT, "kind": kind, "methods": list(maps), **meta}
    everything = {**tensors, **{MAPS_PREFIX + method: m for method, m in maps.items()}}
    everything = {k: v.detach().cpu().contiguous() for k, v in everything.items()}
    return atomic_write(path, lambda tmp: save_file(everything, str(tmp), {"allconv": json.dumps(header)}))


def read_raw_maps(path: str | Path) -> RawMaps:
    """Read and check a raw-maps file; one ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no raw-maps file at {path}: give a file written by allconv visualize --raw")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("allconv", "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable raw-maps file ({type(err).__name__}): write it again with "
                         "allconv visualize --raw") from None
    if not isinstance(header, dict) or header.get("format") != RAW_FORMAT or header.get("kind") not in KIND_TENSORS:
        raise ValueError(f"{path} is not an allconv raw-maps file of format {RAW_FORMAT}: write it again with "
                         "allconv visualize --raw")
    kind, methods = header["kind"], header.get("methods")
    expected = {*KIND_TENSORS[kind], *(MAPS_PREFIX + m for m in methods or ())}
    if not isinstance(methods, list) or set(tensors) != expected:
        raise ValueError(f"{path}: its tensors ({', '.join(sorted(tensors))}) are not those of a {kind} file with "
                         f"methods {methods}: the file is damaged")
    return RawMaps(kind, {m: tensors[MAPS_PREFIX + m] for m in methods},
                   {k: tensors[k] for k in KIND_TENSORS[kind]}, header)
