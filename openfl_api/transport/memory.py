"""In-memory pipes: the same messages through queues, for unit tests and one-process simulation.

A pipe is a pair of queues registered under the pipe's prefix in a process-wide registry; both
sides meet there exactly as two gloo ranks meet through the store. Payloads are copied once, on
send, so a sender may reuse its buffer as it would with gloo; the receiver gets that copy.
"""

from __future__ import annotations

import queue
import threading
from datetime import timedelta
from typing import Callable, Dict, Optional, Tuple

import torch

from openfl_api.errors import TransportError
from openfl_api.transport.base import MAGIC, Limits, Message, Pieces, Pipe, check_frame

__all__ = ["MemoryPipe", "open_memory_pipe"]

_CLOSED = object()
_registry: Dict[str, Tuple["queue.Queue", "queue.Queue"]] = {}
_lock = threading.Lock()


def open_memory_pipe(key: str, rank: int) -> "MemoryPipe":
    """Return this side (rank 0: backend, 1: frontend) of the in-memory pipe named ``key``."""
    with _lock:
        # Whichever side comes second takes the pair out of the registry.
        if key in _registry:
            pair = _registry.pop(key)
        else:
            pair = _registry[key] = (queue.Queue(), queue.Queue())
    inbox, outbox = (pair[0], pair[1]) if rank == 0 else (pair[1], pair[0])
    return MemoryPipe(inbox, outbox)


class MemoryPipe(Pipe):
    """A pipe whose two sides live in one process."""

    def __init__(self, inbox: "queue.Queue", outbox: "queue.Queue") -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False

    def send(self, message: Message, timeout: timedelta) -> None:
        if self._closed:
            raise TransportError("pipe failed while sending: it was closed on this side")
        payload = message.payload
        if isinstance(payload, Pieces):
            payload = payload.flat()
        elif payload is not None:
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
            message = self._inbox.get(timeout=idle.total_seconds())
        except queue.Empty:
            self._closed = True
            raise TransportError(f"pipe failed while waiting for a message: nothing came in {idle}") from None
        if message is _CLOSED:
            self._closed = True
            raise TransportError("pipe failed while waiting for a message: connection closed by peer")
        size = 0 if message.payload is None else message.payload.numel()
        frame = torch.tensor([MAGIC, int(message.kind), len(message.header), size, 1 if size else 0], dtype=torch.int64)
        check_frame(frame, limits)
        # The payload is the sender's private copy, made in send(): hand it over instead of copying
        # it again into a buffer from ``alloc`` (nor is ``progress`` called: it all came at once).
        return Message(message.kind, message.header, message.payload if size else None)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._outbox.put(_CLOSED)
