"""Decoded ImageFolder splits kept on disk, so that a folder's images are decoded once, not on
every run and in every ablate worker (CIFAR-10's 50,000 training JPEGs take 14 to 21 s to
decode on two cores; their cached tensor, 154 MB, reads back in about a second).

One entry per (split folder, input size, fit options): ``<cache>/<name>.safetensors`` holding
``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,), with the class names, a fingerprint of
every file (relative path, size in bytes, mtime and ctime in ns, inode) and a CRC-32 of the
pixels in its metadata. A copy that keeps a file's size and mtime (``cp -p``, ``rsync -a``,
``tar x``) still gets a new inode or change time, which nothing can set back. A folder whose files
change gets a new fingerprint and its entry is rewritten in place, so the cache holds no stale
copies. safetensors, not pickle: reading an entry runs no code.

The folder is ``$ALLCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/allconv/images``, else
``~/.cache/allconv/images``; ``ALLCONV_CACHE_DIR=off`` (or empty) turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import PIL
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from allconv_cli.util import atomic_write

CACHE_ENV = "ALLCONV_CACHE_DIR"
# Bump when decoding or fitting changes what a file becomes, or the entry's layout changes:
# every older entry then misses and is rewritten.
FORMAT_VERSION = 1
STALE_TEMP_SECONDS = 3600  # a temporary file this old belongs to a writer that was killed

_warned: set[Path] = set()  # cache folders already reported as unwritable by this process


def cache_folder() -> Path | None:
    """Where decoded splits are kept, or None when ``ALLCONV_CACHE_DIR`` is ``off`` or empty."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off") else Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
    return base / "allconv" / "images"


def load_or_decode(folder: Path, files: Sequence[Path], labels: torch.Tensor, classes: list[str],
                   input_size: Sequence[int], fit: tuple[str, float],
                   decode: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The images of one ImageFolder split, uint8 (N, C, H, W) in the order of ``files``: read
    from the cache when its entry was made from exactly these files with these options, else
    ``decode()``-d and stored for the next run.

    ``folder`` is the split folder (``DIR/train``), ``files`` its images under it and ``labels``
    int64 (N,) their classes' indices into ``classes``. The cache never makes a load fail: an
    unreadable entry is decoded again, an unwritable folder is reported once on stderr.
    """
    location = cache_folder()
    if location is None:
        return decode()
    entry = location / f"{_entry_name(folder, input_size, fit)}.safetensors"
    fingerprint = _fingerprint(folder, files, classes, input_size, fit)
    images = _read_entry(entry, fingerprint, labels, classes, input_size)
    if images is None:
        images = decode()
        _write_entry(entry, fingerprint, images, labels, classes)
    return images


def _entry_name(folder: Path, input_size: Sequence[int], fit: tuple[str, float]) -> str:
    """The entry's file name: a hash of what a run asks for (the resolved split folder, input
    size, fit), so a changed folder overwrites its own entry rather than adding one."""
    asked = json.dumps([str(folder.resolve()), list(input_size), [fit[0], float(fit[1])]])
    return hashlib.sha256(asked.encode()).hexdigest()[:32]


def _fingerprint(folder: Path, files: Sequence[Path], classes: list[str], input_size: Sequence[int],
                 fit: tuple[str, float]) -> str:
    """SHA-256 (hex) of everything the decoded tensor depends on: the format version, Pillow's
    version (its decoders), the resolved split folder, the classes, the input size, the fit
    options, and each file's relative path, size (bytes), mtime and ctime (ns) and inode. One stat
    per file: about 0.1 s for 60,000 files."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, PIL.__version__, str(folder.resolve()), classes,
                                        list(input_size), [fit[0], float(fit[1])]]).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}"
                      f"\0{stat.st_ctime_ns}\0{stat.st_ino}".encode())
    return digest.hexdigest()


def _read_entry(entry: Path, fingerprint: str, labels: torch.Tensor, classes: list[str],
                input_size: Sequence[int]) -> torch.Tensor | None:
    """The entry's images if it is whole and was made from this fingerprint; None for a missing,
    truncated, corrupt or outdated entry (a miss: the caller decodes and rewrites it)."""
    try:
        with safe_open(str(entry), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return None
            images, stored_labels = f.get_tensor("images"), f.get_tensor("labels")
        whole = (images.dtype == torch.uint8 and tuple(images.shape) == (len(labels), *input_size)
                 and torch.equal(stored_labels, labels) and json.loads(meta["classes"]) == classes
                 and int(meta["crc32"]) == zlib.crc32(images.numpy()))
    except (OSError, SafetensorError, ValueError, KeyError, TypeError):
        return None
    return images if whole else None


def _write_entry(entry: Path, fingerprint: str, images: torch.Tensor, labels: torch.Tensor,
                 classes: list[str]):
    """Store an entry atomically (a unique temporary file in the same folder, then os.replace):
    a reader never sees half a file, and runs writing the same entry at once all succeed, the
    last one's copy staying. A folder that cannot be written is reported once and skipped."""
    images = images.contiguous()
    meta = {"fingerprint": fingerprint, "classes": json.dumps(classes), "crc32": str(zlib.crc32(images.numpy())),
            "format_version": str(FORMAT_VERSION)}
    try:
        atomic_write(entry, lambda tmp: save_file({"images": images, "labels": labels.contiguous()}, str(tmp),
                                                  metadata=meta))
    except OSError as err:
        if entry.parent not in _warned:
            _warned.add(entry.parent)
            reason = os.strerror(err.errno) if err.errno else err.strerror or str(err)
            print(f"Warning: cannot cache decoded images in {entry.parent} ({reason}): they are decoded "
                  f"again on every run; set {CACHE_ENV} to a writable folder, or to off", file=sys.stderr)
        return
    _remove_stale_temps(entry.parent)


def _remove_stale_temps(location: Path):
    """Delete temporary files left by writers that were killed mid-write (each up to the size of
    an entry), once they are older than STALE_TEMP_SECONDS, so no live writer loses its file."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for tmp in location.glob(".*.tmp"):
        with contextlib.suppress(OSError):  # another run removed it first
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
