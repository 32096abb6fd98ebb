"""Processes that end with the command that started them.

``catch_signals`` turns SIGINT, SIGTERM and SIGHUP into a stop that the training loop takes at a
step boundary, after a resumable checkpoint. ``WorkerPool`` runs calls in spawned worker
processes, each with its own pipe and no lock or queue shared between them, so that a worker
that dies, or a parent that dies, leaves nothing blocked. A worker catches the same signals for
its whole life and never escalates: a signal sent to the whole process group reaches it twice
(directly, and forwarded by its parent), and both ask for the same stop. It stops when its parent
dies (a watch thread sends it SIGHUP) and exits when its pipe closes: the pool is done, or its
parent is gone. Imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing import get_context

# SIGHUP: the terminal closed, or (sent by a worker's watch thread) its parent died. Windows has none.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))
# A run stopped at its time limit reports this signal's number (no signal is sent): the alarm is
# what a time limit is, and no other use of it in allconv can be mistaken for one.
TIME_LIMIT = signal.SIGALRM
PARENT_POLL_SECONDS = 0.5  # how often a worker checks that its parent lives: a stop within a second of its death
JOIN_SECONDS = 30  # how long an idle worker may take to exit after its pipe closes before it is killed

_catchers: list[list[int]] = []  # the list of the catcher in force in this process, if any


@contextlib.contextmanager
def catch_signals(escalate: bool = True, forward: Callable[[int], None] | None = None):
    """Record SIGINT, SIGTERM and SIGHUP in the list this yields instead of dying, so that the
    loop can checkpoint. With ``escalate``, a second signal raises KeyboardInterrupt (a second
    Ctrl-C kills); ``forward(signum)`` is called at the first. Inside another catcher it yields
    that one's list and installs nothing (train() inside a worker keeps the worker's rules); off
    the main thread, where Python cannot install handlers, an empty list."""
    if _catchers or threading.current_thread() is not threading.main_thread():
        yield _catchers[0] if _catchers else []
        return
    caught: list[int] = []

    def handler(signum, frame):
        if caught and escalate:
            raise KeyboardInterrupt
        if not caught and forward is not None:
            forward(signum)
        caught.append(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    _catchers.append(caught)
    try:
        yield caught
    finally:
        _catchers.pop()
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_stop_signals(worker_id: int | None = None):
    """A DataLoader ``worker_init_fn``: the worker holds no state, so it leaves a stop to the
    process it feeds, which ends it (it would otherwise die mid-epoch, and its reader with an
    error); torch's own watch ends it within seconds of that process's death."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class WorkerPool:
    """Calls run in spawned worker processes, one call at a time each -> futures. A worker starts
    when a call finds none idle and is reused after. On leaving the ``with`` block the idle workers'
    pipes close and they exit; after an exception (a second signal, a bug here) every worker is
    killed, and its run keeps its last checkpoint."""

    def __init__(self, initializer: Callable[..., None], initargs: tuple = ()):
        self._context = get_context("spawn")  # a fork would copy torch's threads' locks
        self._initializer, self._initargs = initializer, initargs
        self._idle: list = []  # (process, connection) of the workers waiting for a call
        self._processes: list = []  # every worker started and not yet joined
        self._lock = threading.Lock()

    def __enter__(self) -> WorkerPool:
        return self

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` (both picklable) in an idle worker, or a new one."""
        with self._lock:
            worker = self._idle.pop() if self._idle else self._start()
        future = Future()
        future.set_running_or_notify_cancel()
        threading.Thread(target=self._call, args=(worker, future, fn, args), daemon=True).start()
        return future

    def send_signal(self, signum: int):
        """Send ``signum`` to every live worker; safe inside a signal handler (takes no lock)."""
        for process in list(self._processes):
            with contextlib.suppress(ProcessLookupError):
                if process.exitcode is None:
                    os.kill(process.pid, signum)

    def __exit__(self, kind, error, trace):
        if kind is not None:
            for process in list(self._processes):
                process.kill()
        for _, connection in self._idle:
            connection.close()  # the worker reads the end of its pipe and exits
        for process in list(self._processes):
            process.join(JOIN_SECONDS)
            if process.exitcode is None:
                process.kill()
                process.join()
            self._processes.remove(process)

    def _start(self) -> tuple:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(theirs, os.getpid(), self._initializer,
                                                              self._initargs), name="allconv-worker")
        process.start()
        theirs.close()  # the worker holds the only other end: its death closes the pipe
        self._processes.append(process)
        return process, ours

    def _call(self, worker: tuple, future: Future, fn: Callable, args: tuple):
        process, connection = worker
        try:
            connection.send((fn, args))
            ok, value = connection.recv()
        except (EOFError, OSError):
            process.join()
            future.set_exception(ChildProcessError(f"a worker process ended (exit code {process.exitcode}) "
                                                   "before its call returned"))
            return
        except Exception as error:  # a reply that cannot be unpickled; the pipe is still in step
            ok, value = False, RuntimeError(f"a worker's reply to {fn.__name__} cannot be read: {error}")
        with self._lock:
            self._idle.append(worker)  # before the result: a caller may submit again at once
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _serve(connection, parent: int, initializer: Callable[..., None], initargs: tuple):
    """A worker's life: run each call that arrives, send back its result or exception, and exit
    when the pipe closes."""
    _calls(connection, parent, initializer, initargs)
    # Every file was written and closed by the calls; an interpreter's teardown with torch loaded
    # takes seconds (3 to 4 s on a busy 2-core machine), which the command would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _calls(connection, parent: int, initializer: Callable[..., None], initargs: tuple):
    with catch_signals(escalate=False):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
        initializer(*initargs)
        while True:
            try:
                fn, args = connection.recv()
            except EOFError:
                return
            try:
                reply = True, fn(*args)
            except Exception as error:
                error.add_note(f"in a worker process:\n{traceback.format_exc()}")
                reply = False, error
            try:
                connection.send(reply)
            except OSError:  # the parent is gone
                return
            except Exception as error:  # a result or exception that cannot be pickled
                connection.send((False, RuntimeError(f"{fn.__name__}'s reply cannot be sent back: {error}")))


def _watch_parent(parent: int):
    """Send this process SIGHUP once its parent has died (it is then adopted: its parent's pid changes)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGHUP)
