"""In-memory pipes: the same messages through queues, for unit tests and one-process simulation.

A pipe is a pair of channels registered under the pipe's prefix in a process-wide registry; both
sides meet there exactly as two gloo ranks meet through the store. Payloads are copied once, on
send, so a sender may reuse its buffer as it would with gloo; the receiver gets that copy (a sender
that hands its buffer over, ``Message.owned``, is not copied at all). A channel is a queue until
its receiver calls :meth:`MemoryPipe.deliver_to`; from then on each message is handed to the
receiver's handler on the sender's own thread, with no thread switch.
"""

from __future__ import annotations

import queue
import threading
from datetime import timedelta
from typing import Callable, Dict, Optional, Tuple

import torch

from openfl_api.errors import TransportError
from openfl_api.transport.base import Limits, Message, Pieces, Pipe, check_frame, frame_of

__all__ = ["MemoryPipe", "open_memory_pipe"]

_CLOSED = object()
_registry: Dict[str, Tuple["_Channel", "_Channel"]] = {}
_lock = threading.Lock()


class _Channel:
    """One direction of a pipe: a queue, or, once the receiver asked for it, a handler that the
    sender's thread calls with each message (:meth:`MemoryPipe.deliver_to`)."""

    def __init__(self) -> None:
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.on_message: Optional[Callable[[Message], None]] = None
        self.on_close: Optional[Callable[[str], None]] = None

    def put(self, item: object) -> None:
        with self.lock:
            on_message, on_close = self.on_message, self.on_close
            if on_message is None:
                self.queue.put(item)
                return
        _hand(item, on_message, on_close)


def _hand(item: object, on_message: Callable[[Message], None], on_close: Callable[[str], None]) -> None:
    """Give a queued item to a receiver's handlers: a message, or the peer's close."""
    if item is _CLOSED:
        on_close("connection closed by peer")
    else:
        on_message(item)


def open_memory_pipe(key: str, rank: int) -> "MemoryPipe":
    """Return this side (rank 0: backend, 1: frontend) of the in-memory pipe named ``key``."""
    with _lock:
        # Whichever side comes second takes the pair out of the registry.
        if key in _registry:
            pair = _registry.pop(key)
        else:
            pair = _registry[key] = (_Channel(), _Channel())
    inbox, outbox = (pair[0], pair[1]) if rank == 0 else (pair[1], pair[0])
    return MemoryPipe(inbox, outbox)


class MemoryPipe(Pipe):
    """A pipe whose two sides live in one process."""

    queues_sends = True

    def __init__(self, inbox: _Channel, outbox: _Channel) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False

    def send(self, message: Message, timeout: timedelta) -> None:
        if self._closed:
            raise TransportError("pipe failed while sending: it was closed on this side")
        payload = message.payload
        if isinstance(payload, Pieces):
            payload = payload.flat()
        elif payload is not None and not message.owned:
            payload = payload.clone()
        self._outbox.put(Message(message.kind, bytes(message.header), payload))

    def recv(
        self,
        limits: Limits,
        idle: timedelta,
        transfer: timedelta,
        alloc: Callable[[int], torch.Tensor],
        progress: Optional[Callable[[int], None]] = None,
    ) -> Message:
        if self._closed:
            raise TransportError("pipe failed while waiting for a message: it was closed on this side")
        try:
            message = self._inbox.queue.get(timeout=idle.total_seconds())
        except queue.Empty:
            self._closed = True
            raise TransportError(f"pipe failed while waiting for a message: nothing came in {idle}") from None
        if message is _CLOSED:
            self._closed = True
            raise TransportError("pipe failed while waiting for a message: connection closed by peer")
        check_frame(frame_of(message), limits)
        # The payload is the sender's private copy, made in send(): hand it over instead of copying
        # it again into a buffer from ``alloc`` (nor is ``progress`` called: it all came at once).
        return _normal(message)

    def deliver_to(self, on_message: Callable[[Message], None], on_close: Callable[[str], None]) -> bool:
        """From now on the peer's :meth:`send` calls ``on_message(message)`` on the peer's thread,
        and its :meth:`close` calls ``on_close(reason)``; messages already queued are handed over
        here, on this thread, first. The receiver checks each message itself (:func:`frame_of`)."""
        def normalized(message: Message) -> None:
            on_message(_normal(message))

        with self._inbox.lock:
            pending = []
            while True:
                try:
                    pending.append(self._inbox.queue.get_nowait())
                except queue.Empty:
                    break
            self._inbox.on_message, self._inbox.on_close = normalized, on_close
        for item in pending:
            _hand(item, normalized, on_close)
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._inbox.lock:
                self._inbox.on_message = self._inbox.on_close = None
            self._outbox.put(_CLOSED)


def _normal(message: Message) -> Message:
    """A received message as gloo gives it: no payload rather than an empty one."""
    if message.payload is not None and message.payload.numel() == 0:
        return Message(message.kind, message.header, None)
    return message
