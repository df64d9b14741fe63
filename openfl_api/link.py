"""The frontend's link to its backend: join, request and reply, join again, say goodbye.

:class:`Link` is the part of :class:`~openfl_api.frontend.Client` that owns the pipe. Every call
of the client is one request and one reply (:meth:`Link._exchange`). While a reply takes long, a
line every ``status`` interval says what the frontend waits for and what the backend last said of
its version. On the main thread the pipe's blocking waits run on a helper thread, so Ctrl-C is
never held up.

Between requests a :class:`~openfl_api.transport.heartbeat.Beat` sends heartbeats that the backend
echoes; while a reply is awaited the backend pings. When the backend falls silent for the link
timeout the link counts as lost: the frontend says so at once, and its next request joins again
(for up to ``reconnect``) and is repeated. A broken pipe with an end recorded on the backend's
store ends the federation for this frontend; an ``END`` reply with code ``changed`` (the backend's
address-file entry changed) joins the backend's new session.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Callable, Dict, Optional, Union

import torch

from openfl_api.address import Address
from openfl_api.buffers import at_least
from openfl_api.errors import AdmissionError, ConfigurationError, PayloadError, TransportError, WireError
from openfl_api.ledger import Ledger
from openfl_api.payload import FiniteScan, Schema, parse_header
from openfl_api.timeouts import Timeouts
from openfl_api.transport.base import Kind, Limits, Message, Pipe, Silence
from openfl_api.transport.heartbeat import Beat
from openfl_api.transport.rendezvous import join
from openfl_api.transport.store import open_store
from openfl_api.waiting import Helper, interruptible, logged, result

__all__ = ["Link", "MAX_REJOINS", "header_or_empty"]

MAX_REJOINS = 3  # joins again per request before a broken pipe is reported


class Link:
    """The part of :class:`~openfl_api.frontend.Client` that owns the pipe to the backend.

    Expects the attributes :class:`~openfl_api.frontend.Client` sets in its constructor
    (``timeouts``, ``log``, ``ledger``, ``reconnect``, ``protect_wire``, the pipe's and the reply
    buffer's fields) and the method ``_report_again``.
    """

    timeouts: Timeouts
    log: Any
    ledger: Ledger
    reconnect: timedelta
    protect_wire: Optional[bool]
    ended: bool
    end_reason: str
    backend_name: str
    address: Optional[Address]
    _pipe: Optional[Pipe]
    _beat: Optional[Beat]
    _store: Any
    _ended_on_store: Callable[[], Optional[bool]]
    _token: bytes
    _nick_name: str
    _registered: bool
    _rx: torch.Tensor
    _scan_schema: Optional[Schema]
    scan: Optional[FiniteScan]
    _io: Optional[Helper]
    _backend_said: str

    def connect(self, address: Address, token: bytes, nick_name: str, timeout: Optional[timedelta] = None) -> None:
        """Join the backend at ``address``; blocks until admitted."""
        timeout = timeout or self.timeouts.connect
        self._store = open_store(address, backend=False, timeout=timeout, log=self.log)
        self._pipe, self.backend_name, self._ended_on_store = join(
            address, self._store, token, nick_name, timeout, log=self.log, status=self.timeouts.status,
            protect_wire=self.protect_wire)
        self.address, self._token, self._nick_name = address, token, nick_name
        self._registered = False
        if self._pipe.heartbeats:
            self._pipe.link = self.timeouts.link
            self._beat = Beat(self._pipe, self.timeouts.heartbeat, self.timeouts.link, self._link_lost)
        self.log.info(f"joined {self.backend_name} at {address.init_method} as rank {address.rank}")

    def _link_lost(self, reason: Exception) -> None:
        """From the heartbeat's thread: say at once that the backend fell silent."""
        self.log.warning(f"lost the link to {self.backend_name} at {self.address.init_method}: {reason}; "
                         f"the next request joins again (for up to reconnect={self.reconnect})")

    def _drop_pipe(self) -> None:
        if self._beat is not None:
            self._beat.stop()
            self._beat = None
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def _rejoin(self, cause: TransportError, moved: bool = False) -> bool:
        """Join a restarted backend again, with back-off, for up to ``reconnect`` (``moved``: the
        backend asked for it, for at least ``connect_timeout``); True if joined."""
        patience = max(self.reconnect, self.timeouts.connect) if moved else self.reconnect
        deadline = time.monotonic() + patience.total_seconds()
        delay = 0.2
        if moved:
            self.log.info(f"the backend at {self.address.init_method} says: {cause}; joining again")
        else:
            self.log.warning(f"lost the backend at {self.address.init_method} ({cause}); "
                             f"trying to join again for up to {self.reconnect}")
        self._drop_pipe()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.connect(self.address, self._token, self._nick_name,
                             timeout=timedelta(seconds=max(0.5, min(left, self.timeouts.connect.total_seconds()))))
                return True
            except AdmissionError as exc:
                # After a lost link the backend may not have dropped this rank's old pipe yet.
                if getattr(exc, "code", None) != "duplicate":
                    raise
                self.log.debug(f"join again refused: {exc}; the backend still holds the old pipe")
            except (TransportError, RuntimeError) as exc:
                self.log.debug(f"join again failed: {exc}")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 5.0)

    def _alloc(self, size: int) -> torch.Tensor:
        self._rx = at_least(self._rx, size)
        buffer = self._rx[:size]
        if self._scan_schema is not None:
            self.scan = FiniteScan(self._scan_schema, buffer)
        return buffer

    def _progress(self, end: int) -> None:
        if self.scan is not None:
            self.scan.progress(end)

    def _exchange(self, request: Union[Message, Callable[[], Message]], limits: Limits,
                  schema: Optional[Schema] = None, what: str = "the backend's answer",
                  started: "Optional[Future[Message]]" = None) -> Optional[Message]:
        """Send a request (or build it: ``request()``) and receive its reply; None once ended.
        ``started``: the request's first round trip runs already (:meth:`_start`); its reply is awaited.

        A broken pipe with no end recorded on the store means the backend went away (or dropped
        this frontend): join again for up to ``reconnect`` and repeat the request. ``what`` names
        the reply in the lines logged while it takes long. ``schema``: the layout of the reply's
        payload, checked for finite values while it arrives (``self.scan``).

        Raises:
            ConfigurationError: the backend refused this frontend's model.
            AdmissionError: the backend refused this frontend for another reason.
        """
        self._scan_schema, self.scan = schema, None
        if isinstance(request, Message):
            request = (lambda message: lambda: message)(request)
        rejoins = 0
        limits = _with_pings(limits)
        while True:
            try:
                with logged(self.log, self.timeouts.status, lambda: self._waiting_for(what)):
                    if started is not None:
                        running, started = started, None
                        reply = result(running)
                    else:
                        reply = self._round_trip(request(), limits)
                if reply.kind is Kind.END and header_or_empty(reply.header).get("code") == "changed":
                    # The backend's address-file entry changed: it serves it again; join its new session.
                    reason = str(header_or_empty(reply.header).get("reason", ""))[:500]
                    if rejoins < MAX_REJOINS and self._rejoin(TransportError(reason), moved=True):
                        rejoins += 1
                        continue
                    raise TransportError(f"could not join {self.address.init_method} again after the backend "
                                         f"changed it: {reason}")
                break
            except TransportError as exc:
                if isinstance(exc, WireError):
                    self.ledger.refuse_on_wire(exc.reason)
                    self.log.warning(f"refused a message from {self.backend_name}: {exc}")
                if isinstance(exc, Silence):
                    self._link_lost(exc)
                ended = self._ended_on_store()
                if ended:
                    self._end(f"the backend closed the pipe ({exc})")
                    return None
                if self.reconnect > timedelta(0) and rejoins < MAX_REJOINS and self._rejoin(exc):
                    rejoins += 1  # a request the backend keeps dropping is not repeated forever
                    self._report_again(request)  # a restarted backend may have lost them
                    continue
                if ended is None:
                    self._end(f"lost the backend at {self.address.init_method} and could not reach it again "
                              f"within reconnect={self.reconnect}: {exc}")
                    return None
                raise TransportError(
                    f"lost the backend at {self.address.init_method}, which did not record an end: {exc}"
                ) from exc
        if reply.kind is Kind.END:
            fields = header_or_empty(reply.header)
            reason = str(fields.get("reason", "the federation ended"))[:2000]
            code = fields.get("code")
            if code in ("refused", "mismatch"):
                self._end(reason, quiet=True)
                self.log.error(f"the backend {reason}")
                raise (ConfigurationError if code == "mismatch" else AdmissionError)(f"the backend {reason}")
            self._end(reason)
            return None
        return reply

    def _round_trip(self, message: Message, limits: Limits) -> Message:
        """Send ``message`` and receive the reply, skipping the backend's pings (remembering their status)."""
        pipe = self._open_pipe()
        if pipe.queues_sends:  # in-process: the backend answers on this thread, nothing blocks long
            pipe.send(message, self.timeouts.transfer)
            return self._receive(pipe, limits)
        return interruptible(self._call(pipe, message, limits), self._helper())

    def _start(self, message: Message, limits: Limits) -> "Future[Message]":
        """Start the round trip of ``message`` on the I/O thread and return at once; the future
        holds the reply (or the TransportError). Only for a pipe that does not queue its sends."""
        try:
            call = self._call(self._open_pipe(), message, _with_pings(limits))
        except TransportError as exc:
            future: "Future[Message]" = Future()
            future.set_exception(exc)
            return future
        return self._helper().submit(call)

    def _open_pipe(self) -> Pipe:
        if self._pipe is None:
            raise TransportError("the pipe to the backend was closed after an earlier failure")
        return self._pipe

    def _helper(self) -> Helper:
        """The I/O thread: the pipe's blocking waits of the main thread, and the round trips of uploads."""
        if self._io is None:
            self._io = Helper("openfl-frontend-io")
        return self._io

    def _call(self, pipe: Pipe, message: Message, limits: Limits) -> Callable[[], Message]:
        beat = self._beat

        def call() -> Message:
            with beat.request() if beat is not None else contextlib.nullcontext():
                pipe.expect()
                if limits.max_payload:  # a model may come: its first piece lands in the reply buffer
                    self._rx = at_least(self._rx, limits.max_payload)
                    pipe.expect_payload(self._rx)
                pipe.send(message, self.timeouts.transfer)
                return self._receive(pipe, limits)

        return call

    def _receive(self, pipe: Pipe, limits: Limits) -> Message:
        # The backend pings while it handles or holds the request: silence means a cut link.
        idle = self.timeouts.link if pipe.heartbeats else self.timeouts.idle
        limits = Limits(limits.kinds | {Kind.HEARTBEAT}, limits.max_header, limits.max_payload)
        reply = pipe.recv(limits, idle, self.timeouts.transfer, self._alloc, self._progress)
        while reply.kind in (Kind.PING, Kind.HEARTBEAT):  # the backend checks on us while it works
            status = header_or_empty(reply.header).get("status")
            if isinstance(status, str):
                self._backend_said = status[:500]
            reply = pipe.recv(limits, idle, self.timeouts.transfer, self._alloc, self._progress)
        return reply

    def _waiting_for(self, what: str) -> str:
        said = f"; the backend says: {self._backend_said}" if self._backend_said else ""
        return f"{what} from {self.backend_name or 'the backend'} at {self.address.init_method}{said}"

    def _end(self, reason: str, quiet: bool = False) -> None:
        self.ended = True
        self.end_reason = reason
        if not quiet:
            self.log.info(f"federation over: {reason}")

    def finish(self, interrupted: bool = False) -> None:
        """Say goodbye to the backend and release the pipe; ``interrupted``: at once, no goodbye
        (a wait of the pipe may still be blocked on the helper thread)."""
        if self._pipe is None:
            return
        beat, self._beat = self._beat, None
        if beat is not None:
            beat.stop()
        if not interrupted:
            try:
                with beat.request() if beat is not None else contextlib.nullcontext():
                    self._pipe.send(Message(Kind.BYE), self.timeouts.transfer)
            except TransportError:
                pass
            self._pipe.close()
        self._pipe = None
        self._store = None


def _with_pings(limits: Limits) -> Limits:
    """``limits`` that also take the backend's pings, which may come before any reply."""
    return Limits(limits.kinds | {Kind.PING}, limits.max_header, limits.max_payload)


def header_or_empty(raw: bytes) -> Dict[str, Any]:
    try:
        return parse_header(raw)
    except PayloadError:
        return {}
