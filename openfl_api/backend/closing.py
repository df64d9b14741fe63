"""The end of the serve loop: every held request answered with END, then every pipe closed.

:class:`Closing` is the part of :class:`~openfl_api.backend.server.Server` that ends the loop
(``_end``, on the loop's thread or in :meth:`Closing.finish`) and waits for frontends to leave.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Optional

from openfl_api.backend.worker import Joined, Left, Request, end_message
from openfl_api.waiting import logged

__all__ = ["Closing"]


class Closing:
    """The part of :class:`~openfl_api.backend.server.Server` that ends the serve loop and closes its pipes.

    Expects the server's ``exchange``, ``members``, ``addresses``, ``workers``, ``ledger``, ``log``,
    ``timeouts``, ``pinger``, ``stop``, ``stop_reason``, ``ended`` and the private ``_events``, ``_lock``, ``_loop_lock``,
    ``_thread`` and ``_thread_failure`` on the object.
    """

    exchange: Any
    members: Any
    addresses: Any
    workers: Any
    stop: Any
    ledger: Any
    log: Any
    timeouts: Any
    pinger: Any
    stop_reason: Optional[str]
    ended: bool
    _events: "queue.SimpleQueue[Any]"
    _lock: Any
    _loop_lock: Any
    _thread: Optional[threading.Thread]
    _thread_failure: Optional[BaseException]

    def _end(self) -> None:
        exchange = self.exchange
        exchange.accumulation.shutdown()
        with self._lock:
            self.ended = True
        reason = self.stop_reason = self.stop_reason or "the serve loop ended"
        self.addresses.end(reason)
        for worker, _ in exchange.waiting:
            self.ledger.add(worker.label, "pending", -1)
            worker.reply(end_message(reason))
        exchange.waiting.clear()
        self._drain_events(reason)
        self.log.info(f"stopped: {reason}")

    def _drain_events(self, reason: str) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._settle_after_end(event, reason)

    def _settle_after_end(self, event: Any, reason: str) -> None:
        """Handle an event that came after the loop ended: no step fires."""
        if isinstance(event, Request):
            event.worker.free.set()
            event.worker.reply(end_message(reason))
        elif isinstance(event, Joined):
            self.members.joined(event.worker, fire=False)
        elif isinstance(event, Left):
            self.members.left(event.worker, event.reason)

    def finish(self, drain: bool = True) -> Optional[BaseException]:
        """Wait for a loop started with :meth:`Server.start <openfl_api.backend.server.Server.start>` (up to ``timeouts.idle``; one second without
        ``drain``), end it if it still runs, wait up to ``timeouts.drain`` for frontends to leave
        (not at all without ``drain``), and close everything.

        Returns:
            What the started loop raised, or None.
        """
        if self._thread is not None:
            with logged(self.log, self.timeouts.status, "the serve loop to stop (a stop step to fire)"):
                self._thread.join(self.timeouts.idle.total_seconds() if drain else 1.0)
            if self._thread.is_alive():
                self.stop(f"finish() waited {self.timeouts.idle} for the serve loop")
                self._thread.join(5)
        if not self.ended:
            self.stop("finish() was called")
            with self._loop_lock:
                self._end()
        deadline = time.monotonic() + (self.timeouts.drain.total_seconds() if drain else 0.0)
        while self.workers and time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.05)
            except queue.Empty:
                continue
            self._settle_after_end(event, self.stop_reason)
        self.members.close(drain, self.timeouts.drain)
        self.pinger.stop()
        return self._thread_failure
