"""Pipe workers: one per admitted frontend, and the one request path every transport shares.

A worker receives a frontend's requests and hands each to the serve loop's :meth:`Server.handle_now`
on the thread that received it: a gloo pipe's own I/O thread, or, for an in-process pipe
(:meth:`Pipe.deliver_to`), the frontend's thread. ``handle_now`` runs one turn of the loop under
the loop's lock, so steps never race, with no thread switch per message. The reply to a request
is sent by the pipe's thread once the loop has given it (a download the loop holds for a later
version is answered when that version exists; meanwhile the pipe pings the frontend with the
backend's status).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from openfl_api.address import Address
from openfl_api.errors import ProtocolError, TransportError
from openfl_api.payload import FiniteScan, encode_header
from openfl_api.transport.base import Kind, Message, Pipe, check_frame, frame_of
from openfl_api.transport.rendezvous import Lobby, Peer

__all__ = ["Worker", "Joined", "Request", "Left", "AddressChange", "end_message"]


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
    """The watched address file changed."""

    added: List[Address]
    removed: List[Address]


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
        self._thread = threading.Thread(target=self._run, name=f"openfl-pipe-{self.label}", daemon=True)

    def start(self) -> None:
        self._thread.start()

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
            self.pipe.send(message, self.server.timeouts.transfer)
        except TransportError:
            pass  # closed on this side: the frontend learns it at its next request
        finally:
            self._answered = True

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
            self.reply(end_message(server.stop_reason or "this address was removed"))
            return not self.closing
        return True

    def _alloc(self, size: int) -> torch.Tensor:
        # The loop may still accumulate the previous upload after its ACK: wait until it is done.
        while not self.free.wait(self.server.timeouts.tick.total_seconds()):
            if self.server.ended:
                break
        if self._buffer.numel() < size:
            self._buffer = torch.zeros(size, dtype=torch.uint8)  # zero padding keeps the finite check on its fast path
        buffer = self._buffer[:size]
        self.scan = FiniteScan(self.server.model.state.upload_schema, buffer)
        self.receive_started = time.perf_counter()
        return buffer

    def _progress(self, end: int) -> None:
        # Reading the bytes as they land is all this thread does with them before the loop decides.
        self.scan.progress(end)

    def _await_reply(self) -> Message:
        timeouts = self.server.timeouts
        beat = timeouts.heartbeat.total_seconds()
        while True:
            try:
                return self._replies.get(timeout=beat)
            except queue.Empty:
                if self.server.ended and self._replies.empty():
                    return end_message(self.server.stop_reason or "the federation ended")
                # The request is held (a download waiting for its version): a ping fails at once
                # if the frontend died meanwhile, which frees its rank; it carries the backend's status.
                self.pipe.send(Message(Kind.PING, self.server.reporter.ping_header()), timeouts.transfer)

    def _run(self) -> None:
        server = self.server
        timeouts = server.timeouts
        reason = "closed"
        delivered = False
        try:
            # The request limits (largest upload) are known once the backend has its state_dict.
            while not server.prepared.wait(timeouts.tick.total_seconds()):
                if server.ended or self.closing:
                    return
            delivered = self.pipe.deliver_to(self._deliver, self._gone)
            if delivered:
                return  # from now on the frontend's thread brings each request
            while True:
                message = self.pipe.recv(server.request_limits, timeouts.idle, timeouts.transfer, self._alloc,
                                         self._progress)
                if message.kind is Kind.BYE:
                    reason = "said goodbye"
                    break
                self._answered = False
                keep = self.handle(message)
                if not self._answered:
                    self.pipe.send(self._await_reply(), timeouts.transfer)
                if not keep:
                    reason = "address removed"
                    break
        except ProtocolError as exc:
            reason = f"invalid message: {exc}"
            server.ledger.discard(self.label, reason)
        except TransportError as exc:
            reason = str(exc)
        finally:
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
            self._gone("address removed")

    def _gone(self, reason: str) -> None:
        """The pipe is done (the frontend left, broke it or was dropped): release its rank, tell the loop."""
        with self._gone_lock:
            if self._is_gone:
                return
            self._is_gone = True
        self.pipe.close()
        self.lobby.release(self.peer.rank)
        self.server.post(Left(self, reason), force=True)
