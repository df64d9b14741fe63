"""Heartbeats: every gloo pipe hears from its peer at least every ``heartbeat``, so a cut link or a
peer that hangs is named within ``link`` seconds at both ends.

A TCP connection whose link is cut reports nothing: sends queue in the kernel and receives wait,
for minutes. So each side of a pipe expects *some* message within ``link`` and receives with that
timeout (:class:`~openfl_api.transport.base.Silence` when nothing came):

- **Between requests** (a frontend training) the frontend's :class:`Beat` sends a ``HEARTBEAT``
  every ``heartbeat`` and waits up to ``link`` for the backend's echo; the backend's pipe thread,
  receiving the frontend's next message, echoes it at once. Both sides hear from each other.
- **While a request is handled or held** (the frontend waiting for its reply) the backend's
  :class:`Pinger` sends a ``PING`` (carrying the backend's status line) every ``heartbeat``, from
  one thread for every pipe, so a long turn of the serve loop (an aggregation, a checkpoint, a
  step that evaluates) never looks like a cut link. A ping that cannot be delivered within
  ``link`` closes the pipe.
- **While a message is on the wire** ``transfer_timeout`` bounds it instead: how long a large
  payload takes depends on the link's speed, not on its liveness.

Memory pipes have no heartbeat: both sides share a process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, List, Optional

import torch

from openfl_api.errors import TransportError
from openfl_api.transport.base import Kind, Limits, Message, Pipe, Silence

__all__ = ["Beat", "Pinger"]

_ECHO = Limits(frozenset({Kind.HEARTBEAT, Kind.PING}), 64 * 1024, 0)


def _no_payload(size: int) -> torch.Tensor:
    raise TransportError(f"a heartbeat carries no payload, but {size} bytes were announced")


class Beat:
    """The frontend's heartbeat: between requests, a ``HEARTBEAT`` every ``heartbeat`` whose echo
    must come within ``link``.

    A request holds the pipe with :meth:`request`; beats wait for it. When an echo does not come,
    the link is lost: :meth:`request` then raises the reason, and ``on_lost(reason)`` is called
    once, from the beat's thread, so the loss is named at once even while the caller trains.

    Args:
        pipe: the frontend's pipe.
        heartbeat: how long the pipe may stay quiet before a beat is sent.
        link: how long an echo may take.
        on_lost: called with the reason once the link is lost.
    """

    def __init__(self, pipe: Pipe, heartbeat: timedelta, link: timedelta,
                 on_lost: Callable[[TransportError], None]) -> None:
        self._pipe = pipe
        self._heartbeat = heartbeat.total_seconds()
        self._link = link
        self._on_lost = on_lost
        self._lock = threading.Lock()  # held by a request's round trip or by a beat's
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.lost: Optional[TransportError] = None
        self._thread = threading.Thread(target=self._run, name="openfl-heartbeat", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Hold the pipe for one request and its reply; raise the loss if the link was lost."""
        with self._lock:
            if self.lost is not None:
                raise TransportError(str(self.lost))
            try:
                yield
            finally:
                self._last = time.monotonic()

    def stop(self) -> None:
        """Send no more beats; wait for a beat in flight (at most ``link``). The thread lets go of
        the pipe before this returns: a gloo pipe must not outlive the interpreter's teardown in
        a frozen daemon thread."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(self._link.total_seconds() + 1)

    def _run(self) -> None:
        try:
            self._beat()
        finally:
            self._pipe = None  # let go of the pipe: it is closed by its owner

    def _beat(self) -> None:
        tick = min(0.25, self._heartbeat / 4)
        while not self._stop.wait(tick):
            if time.monotonic() - self._last < self._heartbeat or not self._lock.acquire(blocking=False):
                continue
            try:
                if self._stop.is_set():
                    return
                self._pipe.expect()  # the echo comes at once (Pipe.expect)
                self._pipe.send(Message(Kind.HEARTBEAT), self._link)
                self._pipe.recv(_ECHO, self._link, self._link, _no_payload)
                self._last = time.monotonic()
            except TransportError as exc:
                self.lost = exc if isinstance(exc, Silence) else TransportError(f"the heartbeat failed: {exc}")
                self._on_lost(self.lost)
                return
            finally:
                self._lock.release()


class Pinger:
    """The backend's pings: one thread that, every ``heartbeat / 4``, asks each registered pipe
    worker to ping its frontend if it handles or holds a request and has sent nothing for
    ``heartbeat`` (``worker.ping_if_due(now)``, which must not block)."""

    def __init__(self, heartbeat: timedelta) -> None:
        self._tick = min(0.25, heartbeat.total_seconds() / 4)
        self._lock = threading.Lock()
        self._workers: List[Any] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def add(self, worker: Any) -> None:
        """Ping ``worker``'s frontend while its requests are handled or held."""
        with self._lock:
            self._workers.append(worker)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="openfl-pinger", daemon=True)
                self._thread.start()

    def remove(self, worker: Any) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)

    def stop(self) -> None:
        """Stop pinging and wait for the thread, which then holds no pipe."""
        self._stop.set()
        with self._lock:
            thread, self._workers = self._thread, []
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                workers = list(self._workers)
            for worker in workers:
                worker.ping_if_due(now)
            del workers  # hold no pipe while asleep
