"""What every command shares: the options that are not training settings (one declaration and
help text each), one-line errors with exit codes, rich consoles that never wrap a value in a file
or pipe, progress bars on stderr, and small parsers of option values."""

from __future__ import annotations

import contextlib
import re
from typing import Annotated, Optional

import typer

from allconv_cli.processes import TIME_LIMIT

EXIT_USAGE = 2  # bad names, options or input files

# The options every command shares; stdout carries results alone, so --json can be piped
AsJson = Annotated[bool, typer.Option("--json", metavar="", show_default=False,
                                      help="Print the results as JSON on stdout (progress stays on stderr).")]
Force = Annotated[bool, typer.Option("--force", metavar="", show_default=False,
                                     help="Replace outputs that exist (otherwise refused).")]
Device = Annotated[str, typer.Option("--device", help="auto (the first GPU, else the CPU), cpu, cuda or cuda:N.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", metavar="", show_default=False,
                                     help="No progress or time estimate on stderr (none either when it is not a "
                                          "terminal).")]


def out_option(help: str, default_shown: bool = False):
    """--out / -o: what a command writes, and where by default (its help, the command's own)."""
    return typer.Option("--out", "-o", help=help, show_default=default_shown)



@contextlib.contextmanager
def user_errors():
    """Turn the library's ValueError / OSError into one line and exit code 2, no traceback."""
    try:
        yield
    except (ValueError, OSError) as err:
        message = str(err) or type(err).__name__
        if isinstance(err, OSError) and err.strerror:  # "[Errno 17] ..." tells a user nothing; the path does
            message = err.strerror + (f": {err.filename}" if err.filename else "")
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # always one line
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


EXIT_FAILED = 1  # a run that diverged


# SIGHUP, SIGINT, SIGTERM: the shell's 128 + signal number; a --time-limit reached exits as timeout(1) does
EXIT_SIGNAL = {1: 129, 2: 130, 15: 143, TIME_LIMIT: 124}


UNWRAPPED_WIDTH = 10_000  # columns when not a terminal: wide enough that no line is wrapped


def make_console(to_stderr: bool = False):
    """A rich console on stdout (or stderr): the terminal's width on a terminal; in a file or a
    pipe, where rich would wrap at 80 columns, never wrapped, so no value or path is cut in two."""
    from rich.console import Console

    console = Console(stderr=to_stderr)
    if not console.is_terminal:
        console = Console(stderr=to_stderr, width=UNWRAPPED_WIDTH, soft_wrap=True)
    return console


def progress_bar(description: str, quiet: bool):
    """A transient progress bar on stderr -> (callback(done, total), stop); no bar (callback None)
    with --quiet or when stderr is not a terminal, so logs and pipes get none."""
    console = make_console(True)
    if quiet or not console.is_terminal:
        return None, lambda: None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task(description, total=None)
    bar.start()
    return lambda done, total: bar.update(task, completed=done, total=total), bar.stop


def duration(seconds: float) -> str:
    """3725 -> '1 h 02 min'; 200 -> '3 min 20 s'; 12.4 -> '12 s'."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


DURATION_UNITS = {"d": 86400, "h": 3600, "min": 60, "m": 60, "s": 1}


def parse_duration(text: str, option: str = "--time-limit") -> float:
    """'3h50m', '90min', '45s', '1d', '3600' (seconds) or 'H:MM:SS' (a batch system's) -> seconds."""
    words = text.strip().lower().replace(" ", "")
    try:
        if ":" in words:
            parts = [float(p) for p in words.split(":")]
            # a batch system's H:MM:SS: whole fields but the last, none negative, minutes and seconds under 60
            if len(parts) > 3 or not (parts[0] >= 0 and all(0 <= p < 60 for p in parts[1:])
                                      and all(p % 1 == 0 for p in parts[:-1])):
                raise ValueError
            seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
        else:
            pieces = re.fullmatch(r"((\d+(\.\d*)?)(d|h|min|m|s)?)+", words) and \
                re.findall(r"(\d+(?:\.\d*)?)(d|h|min|m|s)?", words)
            if not pieces:
                raise ValueError
            seconds = sum(float(n) * DURATION_UNITS[unit or "s"] for n, unit in pieces)
    except ValueError:
        raise ValueError(f"{option} {text!r} is not a duration: write e.g. 3h50m, 90min, 45s or 1:30:00 "
                         "(H:MM:SS, minutes and seconds 0 to 59)") from None
    if not 0 < seconds < 366 * 86400:
        raise ValueError(f"{option} {text!r}: give a duration above 0 and under a year")
    return seconds


def parse_numbers(text: str, option: str, kind, paper=None):
    """'1,2,3' -> [1, 2, 3] of ``kind``; 'paper' -> ``paper`` where the option has such a list."""
    if paper is not None and text.strip().lower() == "paper":
        return list(paper)
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None


PRECISION_HELP = ("Autocast of the forward and backward passes: fp32, bf16, fp16 (CUDA only) or auto (bf16 where "
                  "the device computes it natively). A map is the gradient of one neuron, and bf16's 8-bit "
                  "mantissa changes it, so keep fp32 unless speed matters more than the exact map.")


# --threads, one declaration for every command that computes on the CPU
Threads = Annotated[Optional[int], typer.Option(
    "--threads", show_default=False,
    help="CPU threads. Default: one per core other processes leave free (training looks again every 10 s).")]


def refuse_existing(paths, force: bool):
    """An output that exists is replaced only with --force: one line naming it otherwise."""
    for path in paths:
        if path is not None and path.exists() and not force:
            raise FileExistsError(f"{path} already exists: pass --force to overwrite it, or choose another --out")
