"""Pipe workers: one per admitted frontend, and the one request path every transport shares.

A worker receives a frontend's requests and hands each to the serve loop's :meth:`Server.handle_now`
on the thread that received it: a gloo pipe's own I/O thread, or, for an in-process pipe
(:meth:`Pipe.deliver_to`), the frontend's thread. ``handle_now`` runs one turn of the loop under
the loop's lock, so steps never race, with no thread switch per message. The reply to a request
is sent by the pipe's thread once the loop has given it (a download the loop holds for a later
version is answered when that version exists). While a request is handled or held, the server's
:class:`~openfl_api.transport.heartbeat.Pinger` pings the frontend with the backend's status;
between requests the worker echoes the frontend's heartbeats, and drops the pipe when nothing
comes for the link timeout (:mod:`openfl_api.transport.heartbeat`).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, List, Optional, Tuple

import torch

from openfl_api.address import Address
from openfl_api.buffers import at_least
from openfl_api.errors import ProtocolError, TransportError, WireError
from openfl_api.payload import MAX_HEADER_BYTES, FiniteScan, encode_header
from openfl_api.transport.base import REPLIES, REQUESTS, Kind, Limits, Message, Pipe, Silence, check_frame, frame_of
from openfl_api.transport.rendezvous import Lobby, Peer
from openfl_api.waiting import seconds

__all__ = ["Worker", "Joined", "Request", "Left", "AddressChange", "end_message"]

_EARLY = Limits(REQUESTS, MAX_HEADER_BYTES, 1 << 62)  # requests before the backend knows its model


@dataclass
class Joined:
    """A frontend was admitted on one of the backend's addresses."""

    worker: "Worker"


@dataclass
class Request:
    """A frontend's request (``DOWNLOAD`` or ``UPLOAD``)."""

    worker: "Worker"
    message: Message


@dataclass
class Left:
    """A frontend's pipe closed: it said goodbye, broke, or was dropped."""

    worker: "Worker"
    reason: str


@dataclass
class AddressChange:
    """The watched address file changed: entries added, removed, changed (``(old, new)`` pairs), or
    an address whose store could only be hosted after retries (``opened``: ``(address, store)``)."""

    added: List[Address] = field(default_factory=list)
    removed: List[Address] = field(default_factory=list)
    changed: List[Tuple[Address, Address]] = field(default_factory=list)
    opened: List[Tuple[Address, Any]] = field(default_factory=list)


def end_message(reason: str, code: str = "ended") -> Message:
    """The ``END`` reply: the federation ended (``code="ended"``) or this frontend was refused
    (``"refused"``, ``"mismatch"``), with the reason."""
    return Message(Kind.END, encode_header({"reason": reason, "code": code}))


class Worker:
    """The pipe of one admitted frontend, as the backend sees it.

    Args:
        server: the backend's :class:`~openfl_api.backend.server.Server`.
        pipe: the pipe to the frontend.
        peer: who the frontend is.
        lobby: the lobby that admitted it (its rank is released there when the pipe closes).
    """

    def __init__(self, server: Any, pipe: Pipe, peer: Peer, lobby: Lobby) -> None:
        self.server = server
        self.pipe = pipe
        self.peer = peer
        self.lobby = lobby
        self.label = f"{peer.address.group_name}/rank{peer.rank}"
        self.clients: Optional[Tuple[str, ...]] = None  # registered with the first request
        self.hosts_many = False  # True when the frontend named its clients (virtual clients)
        self.closing = False
        self.ending = ("this address was removed", "ended")  # the END a closing pipe answers with
        self.refused = False  # the backend refused it (its pipe closes after the answer)
        self._replies: "queue.SimpleQueue[Message]" = queue.SimpleQueue()
        self._buffer = torch.empty(0, dtype=torch.uint8)
        # Set while the loop holds no upload in the receive buffer (it accumulates after its ACK).
        self.free = threading.Event()
        self.free.set()
        self.scan: Optional[FiniteScan] = None  # the finite check of the upload being received
        self.receive_started: Optional[float] = None  # perf_counter() at the first payload byte of the upload at hand
        self._answered = False  # the request at hand was answered from within its turn
        self.joined = threading.Event()  # set once the loop has handled this worker's Joined
        self._gone_lock = threading.Lock()
        self._is_gone = False
        self._gone_reason = ""
        # Sends to the frontend: the pipe's thread, and the pinger while a request is handled.
        self._send_lock = threading.Lock()
        self._handling = False  # a request came and its reply is not sent yet
        self._sent = time.monotonic()  # when the frontend last got something
        pipe.link = server.timeouts.link
        self._thread = threading.Thread(target=self._run, name=f"openfl-pipe-{self.label}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: timedelta) -> None:
        """Wait up to ``timeout`` for the pipe's thread to end (after the pipe was closed): a
        thread still inside a gloo wait when the process exits aborts it."""
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout.total_seconds())

    def reply(self, message: Message) -> None:
        """The answer to the request this worker's frontend waits on.

        Sent at once by a pipe that only queues what it sends (in-process), and by the pipe's own
        thread for an answer without payload (an ACK, an END) to the request it is handling: the
        frontend goes on while its accepted upload is accumulated. A model, or an answer given
        by another thread's turn (a held download released), is sent by the pipe's thread after the
        turn, so a large or slow send never holds the loop's lock.
        """
        inline = message.payload is None and threading.get_ident() == self._thread.ident
        if not (self.pipe.queues_sends or inline):
            self._replies.put(message)
            return
        try:
            self._send(message, self.server.timeouts.transfer)
        except TransportError:
            pass  # closed on this side: the frontend learns it at its next request
        finally:
            self._answered = True

    def _send(self, message: Message, timeout: Any) -> None:
        with self._send_lock:
            try:
                self.pipe.send(message, timeout)
            finally:
                self._sent = time.monotonic()
                if message.kind in REPLIES:
                    self._handling = False

    def ping_if_due(self, now: float) -> None:
        """From the pinger's thread: ping the frontend if its request is handled or held and it has
        heard nothing for a heartbeat; drop the pipe when earlier pings are not taken. Never blocks."""
        timeouts = self.server.timeouts
        if not self._handling or self._is_gone or now - self._sent < timeouts.heartbeat.total_seconds():
            return
        if not self._send_lock.acquire(blocking=False):
            return  # the pipe's thread is sending: the frontend hears from it
        failure = None
        try:
            if self._handling:
                failure = self.pipe.undelivered(timeouts.link)
                if failure is None:
                    self.pipe.post(Message(Kind.PING, self.server.reporter.ping_header()), timeouts.transfer)
                    self._sent = now
        except TransportError as exc:
            failure = str(exc)
        finally:
            self._send_lock.release()
        if failure is not None:
            # Closing a pipe may take a moment: never on the pinger's thread.
            threading.Thread(target=self._gone, args=(failure,), name="openfl-pipe-close", daemon=True).start()

    def handle(self, message: Message) -> bool:
        """The request path of every transport: hand ``message`` to the loop on this thread.

        Returns:
            False when the pipe must close (its address was removed); the reply is given all the same.
        """
        server = self.server
        tick = server.timeouts.tick.total_seconds()
        while not self.joined.wait(tick):  # the loop sees the join before the first request
            if server.ended or self.closing:
                break
        if message.payload is None:
            self.receive_started = None
        else:
            self.free.clear()
        if self.closing or not server.handle_now(Request(self, message)):
            self.free.set()
            if server.stop_reason is not None:
                self.reply(end_message(server.stop_reason))
            else:
                self.reply(end_message(*self.ending))
            return not self.closing
        return True

    def _alloc(self, size: int) -> torch.Tensor:
        server = self.server
        # A payload that came before the backend had its model: its size is checked now.
        while not server.prepared.wait(server.timeouts.tick.total_seconds()):
            if server.ended or self.closing:
                raise TransportError("the backend ended before it had a model to take this upload")
        if size > server.request_limits.max_payload:
            raise ProtocolError(f"payload of {size} bytes is over the limit of {server.request_limits.max_payload}")
        # The loop may still accumulate the previous upload after its ACK: wait until it is done.
        while not self.free.wait(server.timeouts.tick.total_seconds()):
            if server.ended:
                break
        self._buffer = at_least(self._buffer, size)
        buffer = self._buffer[:size]
        self.scan = FiniteScan(self.server.model.state.upload_schema, buffer)
        self.receive_started = time.perf_counter()
        return buffer

    def _progress(self, end: int) -> None:
        # Reading the bytes as they land is all this thread does with them before the loop decides.
        self.scan.progress(end)

    def _await_reply(self) -> Message:
        """The reply the loop gives to a request it holds (a download waiting for its version);
        the pinger pings the frontend meanwhile."""
        tick = self.server.timeouts.tick.total_seconds()
        while True:
            try:
                return self._replies.get(timeout=tick)
            except queue.Empty:
                if self._is_gone:
                    raise TransportError(self._gone_reason) from None
                if self.server.ended and self._replies.empty():
                    return end_message(self.server.stop_reason or "the federation ended")

    def _next(self, last_request: float) -> Message:
        """The frontend's next request; heartbeats are echoed on the way. Raises :class:`Silence`
        when nothing came for the link timeout, or no request for ``timeout``."""
        server, timeouts = self.server, self.server.timeouts
        idle = timeouts.idle.total_seconds()
        while True:
            left = idle - (time.monotonic() - last_request)
            wait = timeouts.link if self.pipe.heartbeats else timeouts.idle
            # Before the backend has its model the largest upload is unknown: _alloc checks it.
            limits = server.request_limits if server.prepared.is_set() else _EARLY
            if self.joined.is_set() and self.free.is_set():
                # The loop serves (its limits are final) and holds no upload in the buffer.
                self._buffer = at_least(self._buffer, limits.max_payload)
                self.pipe.expect_payload(self._buffer)
            try:
                message = self.pipe.recv(limits, min(wait, timedelta(seconds=max(0.001, left))),
                                         timeouts.transfer, self._alloc, self._progress)
            except Silence:
                if left <= wait.total_seconds():
                    raise Silence(f"pipe failed: no request for {seconds(idle)} (API(timeout=...)); the frontend "
                                  "hangs") from None
                raise
            if message.kind is not Kind.HEARTBEAT:
                return message
            self._send(Message(Kind.HEARTBEAT), timeouts.link)

    def _run(self) -> None:
        server = self.server
        timeouts = server.timeouts
        reason = "closed"
        delivered = False
        try:
            if self.pipe.heartbeats:
                # Heard from at once, before the backend has its model: the frontend's heartbeats
                # are echoed, and a request waits (pinged) for the serve loop.
                server.pinger.add(self)
            else:
                # The request limits (largest upload) are known once the backend has its state_dict.
                while not server.prepared.wait(timeouts.tick.total_seconds()):
                    if server.ended or self.closing:
                        return
                delivered = self.pipe.deliver_to(self._deliver, self._gone)
                if delivered:
                    return  # from now on the frontend's thread brings each request
            last_request = time.monotonic()
            while True:
                message = self._next(last_request)
                last_request = time.monotonic()
                if message.kind is Kind.BYE:
                    reason = "said goodbye"
                    break
                self._answered = False
                self._handling = True
                keep = self.handle(message)
                if not self._answered:
                    self._send(self._await_reply(), timeouts.transfer)
                if not keep:
                    reason = "address changed" if self.ending[1] == "changed" else "address removed"
                    break
        except WireError as exc:
            reason = f"refused on the wire: {exc}"
            server.ledger.refuse_on_wire(exc.reason)
        except ProtocolError as exc:
            reason = f"invalid message: {exc}"
            server.ledger.discard(self.label, reason)
        except TransportError as exc:
            reason = str(exc)
        finally:
            server.pinger.remove(self)
            if not delivered:
                self._gone(reason)

    def _deliver(self, message: Message) -> None:
        """A message from an in-process pipe, on the frontend's thread: checked as :meth:`_run`'s
        receive checks one, then handled the same way."""
        try:
            check_frame(frame_of(message), self.server.request_limits)
        except ProtocolError as exc:
            reason = f"invalid message: {exc}"
            self.server.ledger.discard(self.label, reason)
            self._gone(reason)
            return
        if message.kind is Kind.BYE:
            self._gone("said goodbye")
        elif not self.handle(message):
            self._gone("address changed" if self.ending[1] == "changed" else "address removed")

    def _gone(self, reason: str) -> None:
        """The pipe is done (the frontend left, broke it or was dropped): release its rank, tell the loop."""
        with self._gone_lock:
            if self._is_gone:
                return
            self._is_gone = True
            self._gone_reason = reason
        self.pipe.close()
        self.lobby.release(self.peer.rank)
        self.server.post(Left(self, reason), force=True)
