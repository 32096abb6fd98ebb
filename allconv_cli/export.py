"""Export a checkpoint to ONNX, torch.export's ``.pt2`` or a timm safetensors folder, verified.

Every export takes the model's input (images already preprocessed, (B, C, H, W)) and returns
(B, num_classes) class scores; the preprocessing is recorded beside it as metadata. Each file
is written under a temporary name, run on random inputs at two batch sizes against the
PyTorch model, and renamed into place only if it agrees within ``TOLERANCE``.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

from allconv_cli import __version__
from allconv_cli.files.loading import load_checkpoint
from allconv_cli.files.weights import WEIGHTS_NAME, resolve_weights
from allconv_cli.models.registry import resolve_name
from allconv_cli.util import atomic_write, read_text

FORMATS = ("onnx", "pt2", "safetensors")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest allowed |export - PyTorch fp32| as a fraction of the largest |PyTorch output|.
# Measured on random-weight model-a, model-c, all-cnn-c (plain and BatchNorm) and
# all-cnn-imagenet: fp32 agrees to 3e-7, fp16 to 8e-4, bf16 to 6e-3 with torch and timm and to
# 3.2e-2 on onnx's reference evaluator. A wrong weight or layout is off by ~100 %.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-1}
BATCH_SIZES = (1, 3)  # verified at both, so a batch axis fixed at 1 or 3 fails
EXAMPLE_BATCH = 2  # traced at 2: torch.export specializes a dimension whose example is 0 or 1
ONNX_BF16_OPSET = 22  # the first opset whose Conv accepts bfloat16; torch's default (20) does not
TIMM_WEIGHTS = "model.safetensors"  # the first name timm's local-dir loader looks for
PREPROCESS_WEIGHTS = "preprocess.safetensors"  # ZCA tensors, kept out of timm's strict load
PT2_META = "allconv.json"  # extra file inside the .pt2 archive
FORMAT_OVERHEAD = 2**20  # bytes beyond the weights that any export may need on disk
ONNX_PACKAGES = "onnx onnxscript onnxruntime"  # what ONNX export needs, as pipx and pip name them


class VerificationError(ValueError):
    """The written export does not reproduce the PyTorch model within tolerance."""


@dataclass
class ExportResult:
    format: str
    path: str
    size: int  # bytes; a folder's is the sum of its files
    dtype: str
    max_abs_diff: float  # largest |export - PyTorch| over every output at every batch size
    tolerance: float  # absolute: relative_tolerance * output_scale
    relative_tolerance: float
    output_scale: float  # largest |PyTorch output|
    batch_sizes: list[int]
    verified_with: str
    warnings: list[str] = field(default_factory=list)


def output_folder(checkpoint: str | Path) -> Path:
    """Where a command writes by default for ``checkpoint``: its run folder (a folder holding
    ``model.safetensors``, given as the folder or that file), or else the current directory. Never
    the installed package (the bundled weights' folder), nor a folder this user cannot write."""
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    is_run = path.is_dir() or path.name == WEIGHTS_NAME
    package = Path(__file__).resolve().parent
    if is_run and not folder.resolve().is_relative_to(package) and os.access(folder, os.W_OK | os.X_OK):
        return folder
    return Path(".")


def default_out(checkpoint: str | Path, weights: Path, fmt: str) -> Path:
    """``RUN/model.onnx``, ``RUN/model.pt2``, ``RUN/export-safetensors/``; the current
    directory instead of RUN where ``output_folder`` says so."""
    folder = output_folder(checkpoint)
    return folder / ("export-safetensors" if fmt == "safetensors" else f"{weights.stem}.{fmt}")


def export(run: str | Path, fmt: str, dtype: str = "fp32", out: str | Path | None = None,
           force: bool = False) -> ExportResult:
    """Export the checkpoint at ``run`` (a run folder or .safetensors file) as ``fmt``, verified.

    Raises ValueError (bad option, verification failure), FileNotFoundError (no weights),
    FileExistsError (``out`` exists and ``force`` is off) or PermissionError (``out`` cannot
    be written), each naming the fix; nothing is left at ``out`` after a failure.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use --format {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use --dtype {', '.join(DTYPES)}")
    weights = resolve_weights(run)
    out = Path(out) if out is not None else default_out(run, weights, fmt)
    _check_out(out, fmt, force)
    if fmt == "onnx":
        _require_onnx()

    loaded = load_checkpoint(weights)
    model, meta, preprocess_tensors = loaded.model, loaded.meta, loaded.preprocess.to_meta()[1]
    for key in ("model", "input_size", "preprocess"):
        if key not in meta:
            raise ValueError(f"{weights} has no {key!r} in its allconv metadata; "
                             "re-save it with this allconv version (allconv train writes it)")
    info = _export_meta(meta, dtype)
    inputs = _sample_inputs(loaded.preprocess, meta["input_size"])
    expected = _reference_outputs(model, inputs)
    model.to(DTYPES[dtype])  # in place, after the fp32 reference; BatchNorm's counter stays int
    _check_space(out, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    write = {
        "onnx": lambda tmp: _write_onnx(model, info, tmp),
        "pt2": lambda tmp: _write_pt2(model, info, tmp),
        "safetensors": lambda tmp: _write_timm_folder(model, info, preprocess_tensors, tmp),
    }[fmt]
    runner = {"onnx": _onnx_runner, "pt2": _pt2_runner, "safetensors": _timm_runner}[fmt]
    check = {}

    def write_and_verify(tmp: Path):
        write(tmp)
        run_export, check["verified_with"] = runner(tmp, dtype)
        check.update(_compare(run_export, inputs, expected, dtype, fmt, out))

    (_atomic_folder if fmt == "safetensors" else atomic_write)(out, write_and_verify)
    files = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else [out]
    return ExportResult(format=fmt, path=str(out), size=sum(p.stat().st_size for p in files), dtype=dtype,
                        batch_sizes=list(BATCH_SIZES),
                        warnings=_preprocess_warnings(meta["preprocess"], fmt, weights), **check)


def _check_out(out: Path, fmt: str, force: bool):
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} already exists: pass --force to overwrite it, or choose another --out")
        if fmt == "safetensors" and not _is_timm_export(out):
            # --force replaces a whole folder: only ever one that this command wrote
            raise FileExistsError(f"{out} exists and is not an allconv safetensors export; "
                                  "choose another --out (--force only replaces earlier exports)")
        if fmt != "safetensors" and not out.is_file():
            raise FileExistsError(f"{out} exists and is not a file; choose another --out")
    existing = _existing_parent(out)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: {existing} is not a writable folder; "
                              "choose another --out")


def _existing_parent(out: Path) -> Path:
    """The nearest folder above ``out`` that exists: where its missing folders will be made."""
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    return existing


def _is_timm_export(folder: Path) -> bool:
    config = folder / "config.json"
    try:
        return folder.is_dir() and "allconv" in json.loads(read_text(config))
    except (OSError, ValueError):
        return False


def _check_space(out: Path, weight_bytes: int):
    """Refuse before writing when the disk lacks room: torch's .pt2 writer aborts the whole
    process on a full disk instead of raising. Every format holds the weights once, plus its
    graph and metadata (0.13 MB in all-cnn-c's .pt2), within ``FORMAT_OVERHEAD``."""
    existing = _existing_parent(out)
    needed, free = weight_bytes + FORMAT_OVERHEAD, shutil.disk_usage(existing).free
    if free < needed:
        raise OSError(f"not enough space for {out}: it needs about {needed / 1e6:.1f} MB and "
                      f"{existing} has {free / 1e6:.1f} MB free; free some space or choose another --out")


def _require_onnx():
    for module in ("onnx", "onnxscript"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(f"ONNX export needs the {module} package: pipx inject allconv {ONNX_PACKAGES} "
                             f"(pipx install), or pip install {ONNX_PACKAGES} (pip, in allconv's "
                             "environment)") from None


def _export_meta(meta: dict, dtype: str) -> dict:
    """What every export records: enough to rebuild the model and prepare its input."""
    return {
        "model": resolve_name(meta["model"]),
        "model_kwargs": meta.get("model_kwargs", {}),
        "classes": meta.get("classes"),
        "input_size": list(meta["input_size"]),
        "preprocess": meta["preprocess"],
        "dtype": dtype,
        "allconv_version": __version__,
        "torch_version": torch.__version__,
    }


def _preprocess_warnings(preprocess: dict, fmt: str, weights: Path) -> list[str]:
    if preprocess.get("kind") != "zca":
        return []
    if fmt == "safetensors":
        return [f"ZCA preprocessing does not fit timm's mean/std: config.json sets mean 0, std 1 and "
                f"records GCN + ZCA under 'allconv', with its tensors in {PREPROCESS_WEIGHTS}"]
    return [f"the {fmt} export expects GCN + ZCA-whitened input: its settings are in the metadata, "
            f"the whitening matrix only in {weights} (preprocess.zca_mean, preprocess.zca_matrix)"]


def _sample_inputs(preprocess: torch.nn.Module, input_size: list[int]) -> list[torch.Tensor]:
    """Random [0, 1] images through the checkpoint's preprocessing: what the model sees."""
    generator = torch.Generator().manual_seed(0)  # the same check on every run
    with torch.no_grad():
        return [preprocess(torch.rand(batch, *input_size, generator=generator)).float()
                for batch in BATCH_SIZES]


def _reference_outputs(model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x in inputs]  # (B, num_classes), fp32, eval mode


def _compare(run_export: Callable, inputs, expected, dtype: str, fmt: str, out: Path) -> dict:
    with torch.no_grad():
        diff = max((run_export(x).float() - y).abs().max().item() for x, y in zip(inputs, expected))
    scale = max(y.abs().max().item() for y in expected)
    tolerance = TOLERANCE[dtype] * scale
    if not diff <= tolerance:  # also catches NaN
        raise VerificationError(
            f"the {fmt} export differs from the PyTorch model by {diff:.3g} (tolerance {tolerance:.3g} "
            f"for {dtype}); nothing was written to {out}: try --dtype fp32 or another --format")
    return {"max_abs_diff": diff, "tolerance": tolerance, "relative_tolerance": TOLERANCE[dtype],
            "output_scale": scale}


def _example(model: torch.nn.Module, info: dict) -> tuple[torch.Tensor]:
    dtype = next(model.parameters()).dtype
    return (torch.zeros(EXAMPLE_BATCH, *info["input_size"], dtype=dtype),)


def _dynamic_batch() -> tuple[dict]:
    return ({0: torch.export.Dim("batch")},)  # forward(x): axis 0 of x


def _write_onnx(model: torch.nn.Module, info: dict, path: Path):
    bf16 = info["dtype"] == "bf16"
    program = torch.onnx.export(
        model, _example(model, info), dynamo=True, dynamic_shapes=_dynamic_batch(),
        input_names=["input"], output_names=["logits"], verbose=False,
        opset_version=ONNX_BF16_OPSET if bf16 else None,
        # torch 2.14's graph optimizer folds BatchNorm into bf16 convs as float32 weights,
        # which onnx.checker rejects ("W has inconsistent type"): bf16 stays unoptimized
        optimize=not bf16,
    )
    # metadata_props holds strings: lists and dicts as JSON
    program.model.metadata_props.update(
        {key: value if isinstance(value, str) else json.dumps(value) for key, value in info.items()})
    program.save(path, external_data=False)  # weights inside the one file, no side-file


def _onnx_runner(path: Path, dtype: str) -> tuple[Callable, str]:
    """onnx.checker, then onnxruntime on the CPU, or onnx's reference evaluator.

    onnxruntime's CPU provider has no bfloat16 Conv (NOT_IMPLEMENTED in 1.32), so bf16 runs
    on the reference evaluator, as does every dtype where onnxruntime is not installed (slow in
    fp16: ~5 s for all-cnn-c at batch 3, against ~1 s in fp32 and bf16).
    """
    import onnx

    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0]
        raise VerificationError(f"the onnx export fails onnx.checker ({first}); "
                                "try --dtype fp32 or --format pt2") from None
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None and dtype != "bf16":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run, name = session.run, f"onnx.checker + onnxruntime {onnxruntime.__version__} (CPU)"
    else:
        from onnx.reference import ReferenceEvaluator

        run, name = ReferenceEvaluator(proto).run, f"onnx.checker + onnx.reference {onnx.__version__}"
    if dtype == "bf16":
        import ml_dtypes  # numpy has no bfloat16; onnxscript depends on ml_dtypes for it

        np_dtype = ml_dtypes.bfloat16
    else:
        np_dtype = np.float16 if dtype == "fp16" else np.float32

    def run_export(x: torch.Tensor) -> torch.Tensor:
        (logits,) = run(None, {"input": x.numpy().astype(np_dtype)})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    return run_export, name


def _write_pt2(model: torch.nn.Module, info: dict, path: Path):
    program = torch.export.export(model, _example(model, info), dynamic_shapes=_dynamic_batch())
    # a file object, not the path: torch rejects paths that do not end in .pt2, as temporary names do
    with open(path, "wb") as f:
        torch.export.save(program, f, extra_files={PT2_META: json.dumps(info)})


def _pt2_runner(path: Path, dtype: str) -> tuple[Callable, str]:
    # torch.export.load unpickles parts of the archive: only ever the file just written here
    with open(path, "rb") as f:
        module = torch.export.load(f).module()
    return lambda x: module(x.to(DTYPES[dtype])), "torch.export.load(...).module()"


def _timm_config(model: torch.nn.Module, info: dict) -> dict:
    """timm's config.json: architecture, model_args and a pretrained_cfg that timm can parse.

    timm builds ``PretrainedCfg(**pretrained_cfg)``, so unknown keys there would break
    loading; allconv's own record goes at the top level, under "allconv", which timm ignores.
    """
    preprocess, input_size = info["preprocess"], info["input_size"]
    if preprocess["kind"] == "standardize":
        mean, std = preprocess["mean"], preprocess["std"]
    else:  # zca: timm's transforms give [0, 1] pixels, the rest is the user's (see the warning)
        mean, std = [0.0] * input_size[0], [1.0] * input_size[0]
    with torch.no_grad():
        maps = model.forward_features(torch.zeros(1, *input_size, dtype=next(model.parameters()).dtype))
    pretrained_cfg = {key: value for key, value in model.pretrained_cfg.items() if key != "architecture"}
    pretrained_cfg.update(input_size=input_size, mean=mean, std=std, num_classes=model.num_classes,
                          pool_size=list(maps.shape[-2:]))  # (h, w) of the global average
    config = {"architecture": info["model"], "num_classes": model.num_classes,
              "num_features": model.num_features, "model_args": info["model_kwargs"]}
    if info["classes"]:
        config["label_names"] = info["classes"]
    return {**config, "pretrained_cfg": pretrained_cfg, "allconv": info}


def _write_timm_folder(model: torch.nn.Module, info: dict, preprocess_tensors: dict, folder: Path):
    # plain state dicts (the model's already in the export dtype), without allconv's checkpoint
    # metadata: the preprocessing lives in config.json, beside them
    for name, tensors in ((TIMM_WEIGHTS, model.state_dict()), (PREPROCESS_WEIGHTS, preprocess_tensors)):
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name),
                      metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_timm_config(model, info), indent=2) + "\n")


def _timm_runner(folder: Path, dtype: str) -> tuple[Callable, str]:

    # timm builds an fp32 model and copies the stored (possibly fp16/bf16) weights into it
    model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
    return model, 'timm.create_model("local-dir:...", pretrained=True)'


def _atomic_folder(out: Path, write: Callable[[Path], None]):
    """Build the folder under a temporary sibling name, then rename it to ``out``.

    An existing ``out`` (allowed by --force) is moved aside first and removed last: a crash
    leaves the old folder (at ``out`` or in a hidden ``.NAME.*.old`` sibling) or the new one,
    never a half-written one at ``out``.
    """
    token = secrets.token_hex(6)
    tmp, old = out.with_name(f".{out.name}.{token}.tmp"), out.with_name(f".{out.name}.{token}.old")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # unlike tempfile.mkdtemp's 0700, the usual mode (umask applies)
        write(tmp)
        if out.exists():
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except OSError as err:  # a full disk or an unwritable folder: name the folder asked for, not tmp
        shutil.rmtree(tmp, ignore_errors=True)
        message = str(err.strerror or err).replace(str(tmp), str(out))
        raise OSError(err.errno, message if str(out) in message else f"cannot write {out}: {message}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
