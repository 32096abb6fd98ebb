"""Leaf helpers shared by every layer: text files read as editors save them, atomic file and
folder writes, did-you-mean hints, values shown as TOML / JSON write them, the arguments of the
scripts in scripts/. Imports nothing of allconv's."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def read_text(path: str | Path) -> str:
    """A text file as a user's editor may have saved it: UTF-8 with or without a byte-order mark
    (some Windows editors write one), lines ending in \\n, \\r\\n or \\r; returned with \\n
    line ends. Every reader of a text file goes through it. Not UTF-8: UnicodeDecodeError."""
    text = Path(path).read_bytes().decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name in ``path``'s folder, then rename it to ``path``.

    A crash or a full disk at any instant leaves the old ``path`` (if any) untouched. Any
    failure to write (OSError, or the RuntimeError / SafetensorError that torch's and
    safetensors' writers raise on a full disk) becomes one OSError naming ``path``, not the
    temporary file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise OSError(getattr(err, "errno", None), f"cannot write {path}: {_reason(err)}") from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def _reason(err: Exception) -> str:
    """The cause of a failed write in a few words, with the likely fix."""
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return "a file is in the way of its folder; choose another path"
    if isinstance(err, OSError) and err.strerror:
        hint = {28: "free some space or write elsewhere", 13: "choose a folder you can write",
                30: "choose a folder you can write"}.get(err.errno, "")
        return err.strerror + (f" ({hint})" if hint else "")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{first} (is the disk full, or the folder not writable?)"


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def show_value(value, quote: bool = True, most: int = 60) -> str:
    """A value as TOML / JSON would write it, on one line and at most ``most`` characters."""
    try:
        text = json.dumps(value) if quote or not isinstance(value, str) else value
    except (TypeError, ValueError):  # a TOML date or time
        text = str(value)
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= most else text[: most - 3] + "..."


def lazy_attributes(package: str, api: dict[str, str]):
    """``(__getattr__, __dir__)`` for a package whose public names (``api``: name -> submodule)
    import their submodule on first use, so importing the package itself stays cheap."""
    def getattr_(name):
        if name in api:
            return getattr(importlib.import_module(f"{package}.{api[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return getattr_, lambda: sorted(api)


def plural(count: int, noun: str) -> str:
    """(1, 'epoch') -> '1 epoch'; (3, 'epoch') -> '3 epochs'; thousands grouped: '1,000 images'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def write_folder(out: str | Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Write a folder whole: ``write(folder)`` fills a new folder beside ``out``, which then takes
    ``out``'s place, so that nothing of an earlier folder stays (a class the new set lacks) and a
    write that fails or is stopped leaves ``out`` as it was. An ``out`` that holds anything is
    replaced only if ``replace``; a file is never."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: give a folder")
    if out.exists() and any(out.iterdir()) and not replace:
        raise FileExistsError(f"{out} is not empty: give a new folder, or --force to replace it whole")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(staging)
        old = staging.with_name(staging.name + ".old")
        if out.exists():
            out.rename(old)
        try:
            staging.rename(out)
        except OSError:
            if old.exists():  # the earlier folder back in its place
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already where the write succeeded
    return out


class ScriptArguments(argparse.ArgumentParser):
    """argparse as allconv's commands answer a bad argument: one line, ``Error: ...``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"Error: {message}\n")


def count_argument(least: int, most: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``least`` to ``most``."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: give {least:,} to {most:,}")
        return value

    return count
