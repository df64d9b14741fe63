"""Waits that say what they wait for, and blocking calls that Ctrl-C can interrupt.

:func:`logged` registers a wait with one watchdog thread per process, which logs, every
interval while the wait lasts, what it waits for and since when::

    with waiting.logged(log, timeouts.status, lambda: f"the model of version {v} from {backend}"):
        reply = pipe.recv(...)

    # logs, every 10 s while it lasts:
    # still waiting for the model of version 4 from backend (for 20 s)

:func:`interruptible` runs a blocking call that cannot be interrupted (a gloo receive, the
set-up of a gloo pipe, both in C++) on a helper thread when called from the main thread, and
waits for it there, so that Ctrl-C raises ``KeyboardInterrupt`` at once instead of when the call
returns. Elsewhere it runs the call on the calling thread: only the main thread sees Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import signal
import sys
import threading
import time
import queue
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar, Union

__all__ = ["logged", "interruptible", "result", "Helper", "seconds", "exit_fast_after_interrupt", "exits_fast_when_interrupted"]

T = TypeVar("T")
_POLL_S = 0.5  # how late a status line may be; the watchdog wakes at most this often


def seconds(value: float) -> str:
    """``"12 s"``, ``"3 min 05 s"``: a duration as log lines say it."""
    value = int(round(value))
    if value < 120:
        return f"{value} s"
    return f"{value // 60} min {value % 60:02d} s"


class _Wait:
    __slots__ = ("log", "interval", "what", "started", "due", "origin")

    def __init__(self, log: Any, interval: float, what: Callable[[], str], origin: Tuple[str, str, int]) -> None:
        self.log = log
        self.interval = interval
        self.what = what
        self.started = time.monotonic()
        self.due = self.started + interval
        self.origin = origin  # (module, function, line) of the code that waits, named in the log line

    def say(self, now: float) -> None:
        module, function, line = self.origin
        log = self.log.patch(lambda record: record.update(name=module, function=function, line=line))
        log.info(f"still waiting for {self.what()} (for {seconds(now - self.started)})")


class _Watchdog:
    """One daemon thread that logs the waits that last longer than their interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waits: Dict[int, _Wait] = {}
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def add(self, wait: _Wait) -> int:
        with self._lock:
            key = next(self._ids)
            self._waits[key] = wait
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="openfl-waits", daemon=True)
                self._thread.start()
            return key

    def remove(self, key: int) -> None:
        with self._lock:
            self._waits.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(_POLL_S)
            now = time.monotonic()
            with self._lock:
                due: List[_Wait] = [w for w in self._waits.values() if w.due <= now]
                for wait in due:
                    wait.due = now + wait.interval
            for wait in due:
                try:
                    wait.say(now)
                except Exception as exc:  # a describing callable must not kill the watchdog
                    wait.log.debug(f"could not describe a wait: {exc!r}")


_watchdog = _Watchdog()


@contextlib.contextmanager
def logged(log: Any, interval: timedelta, what: Union[str, Callable[[], str]]) -> Iterator[None]:
    """Within the block, log ``still waiting for <what> (for N s)`` at INFO every ``interval``.

    ``what`` is a string or a callable called at each line, so the line can say what is known
    then (the backend's last status, the attempt number).
    """
    describe = what if callable(what) else (lambda: what)
    caller = sys._getframe(2)  # the frame with the ``with`` statement (past contextlib's __enter__)
    origin = (caller.f_globals.get("__name__", "?"), caller.f_code.co_name, caller.f_lineno)
    key = _watchdog.add(_Wait(log, interval.total_seconds(), describe, origin))
    try:
        yield
    finally:
        _watchdog.remove(key)


class Helper:
    """One daemon thread that runs the calls given to it, one at a time.

    Unlike ``ThreadPoolExecutor``'s threads, it never holds up the interpreter's exit: a call
    stuck in C++ (a gloo receive from a peer that hangs) dies with the process.
    """

    def __init__(self, name: str) -> None:
        self._calls: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], T]) -> "Future[T]":
        future: "Future[T]" = Future()
        self._calls.put((call, future))
        return future

    def _run(self) -> None:
        while True:
            _settle(*self._calls.get())


def _settle(call: Callable[[], Any], future: "Future[Any]") -> None:
    try:
        future.set_result(call())
    except BaseException as exc:
        future.set_exception(exc)


def interruptible(call: Callable[[], T], helper: Optional[Helper] = None) -> T:
    """Return ``call()``; on the main thread, run it on a helper thread so Ctrl-C is not held up.

    Args:
        call: the blocking call.
        helper: runs the call (a caller that makes many such calls keeps one); default: a new
            daemon thread.

    If the main thread is interrupted, ``KeyboardInterrupt`` propagates at once and the helper
    thread is left to finish or to die with the process.
    """
    if threading.current_thread() is not threading.main_thread():
        return call()
    if helper is not None:
        future = helper.submit(call)
    else:
        future = Future()
        threading.Thread(target=_settle, args=(call, future), name="openfl-blocking-call", daemon=True).start()
    return result(future)


def result(future: "Future[T]") -> T:
    """``future.result()``, waited so that Ctrl-C on the main thread raises at once."""
    if threading.current_thread() is not threading.main_thread():
        return future.result()
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except _FutureTimeout:
            continue


_interrupted = threading.Event()


def exit_fast_after_interrupt() -> None:
    """Make this process end at once, by SIGINT, once the ``KeyboardInterrupt`` that is
    propagating has been printed and the ``atexit`` callbacks registered after openfl_api was
    imported have run.

    Without it, a Ctrl-C'd rank spends a second or more in the interpreter's final garbage
    collection of torch's objects, and a pipe thread still blocked in gloo can wake up during
    that teardown and abort the process ("terminate called without an active exception").
    """
    _interrupted.set()


@atexit.register
def _end_interrupted_process() -> None:
    if not _interrupted.is_set():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        from loguru import logger

        logger.remove()  # closes (and so flushes) every sink
    except Exception:
        pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(128 + signal.SIGINT)


def exits_fast_when_interrupted(method: Any) -> Any:
    """Decorate a blocking API method: when Ctrl-C interrupts it, the process ends at once by
    SIGINT once the interrupt has been printed (see :func:`exit_fast_after_interrupt`)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except KeyboardInterrupt:
            exit_fast_after_interrupt()
            raise

    return wrapper
