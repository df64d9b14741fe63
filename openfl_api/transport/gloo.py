"""Pipes over a two-rank ``ProcessGroupGloo`` built on a ``PrefixStore`` of the address's store.

Only public torch API is used: ``ProcessGroupGloo(store, rank, 2, options)`` and its
``send``/``recv``. Gloo reports a peer that crashed at once (the TCP connection closes); a receive
that times out closes the pair, which is why a pipe that timed out is dead.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Callable, List, Optional

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store

from openfl_api.errors import TransportError
from openfl_api.transport.interfaces import IFNAME_VAR, binding
from openfl_api.transport.base import (
    FRAME, MAGIC, Limits, Message, Pieces, Pipe, check_frame, check_pieces, payload_size,
)

__all__ = ["GlooPipe", "open_gloo_pipe"]

_TAG = 0


def _reason(exc: BaseException) -> str:
    """Gloo's error, as a log line can say it: its first line without the C++ source location and
    the generic advice gloo appends."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically caused")[0].strip()[:300]


def open_gloo_pipe(store: Store, prefix: str, rank: int, timeout: timedelta, host: Optional[str]) -> "GlooPipe":
    """Build this side (rank 0: backend, 1: frontend) of a pipe; blocks until both sides are up.

    Args:
        store: the address's store (the control plane).
        prefix: a key prefix unique to this pipe.
        rank: 0 on the backend, 1 on the frontend.
        timeout: how long to wait for the other side to build its half.
        host: the tcp host of the address (None for ``file://``): it decides the interface each
            side binds to (:func:`openfl_api.transport.interfaces.binding`).

    Raises:
        TransportError: the device or the connection failed; the message names the address this
            side bound to and the fix.
    """
    bound = binding(host, backend=rank == 0)
    options = ProcessGroupGloo._Options()
    try:
        device = (ProcessGroupGloo.create_device(interface=bound.interface) if bound.interface
                  else ProcessGroupGloo.create_device(hostname=bound.hostname))
    except RuntimeError as exc:
        raise TransportError(f"could not open a pipe on {bound}: {_reason(exc)}; set "
                             f"{IFNAME_VAR} to an interface of this machine that reaches the other side") from exc
    options._devices = [device]
    options._timeout = timeout
    options._threads = 1  # send and recv run on the caller's thread; gloo's workers only serve collectives
    try:
        group = ProcessGroupGloo(PrefixStore(prefix, store), rank, 2, options)
    except RuntimeError as exc:
        first = _reason(exc)
        peer = "the backend" if rank == 1 else "the frontend"
        raise TransportError(
            f"could not connect the pipe to {peer} within {timeout}: {first}. This side bound to {bound}; check "
            f"that the two machines reach each other there (firewall, routes), or choose the interface with "
            f"{IFNAME_VAR}=<interface>"
        ) from exc
    return GlooPipe(group, peer=1 - rank)


#: Bytes of a message's first gloo message: the frame, the piece table and the header travel in it
#: when they fit (every control message and the header of most models), else the rest follows.
INLINE = 32 * 1024
_FRAME_BYTES = FRAME * 8


class GlooPipe(Pipe):
    """A pipe over a two-rank gloo process group.

    A message is sent as one fixed-size control message of :data:`INLINE` bytes (the frame, then
    the piece table, then the header, zero-padded), the overflow of that control block when it is
    larger, and the payload's pieces. Sends are posted together and waited once; the receiver
    waits for the control message, checks the frame, and posts every piece at once. On loopback
    each separately waited gloo operation costs a thread hand-off, hence so few of them.
    """

    def __init__(self, group: ProcessGroupGloo, peer: int) -> None:
        self._group = group
        self._peer = peer
        self._first = torch.zeros(INLINE, dtype=torch.uint8)

    def _post(self, send: bool, tensor: torch.Tensor, what: str):
        try:
            if send:
                return self._group.send([tensor], self._peer, _TAG)
            return self._group.recv([tensor], self._peer, _TAG)
        except RuntimeError as exc:
            raise TransportError(f"pipe failed while {what}: {_reason(exc)}") from exc

    def _wait(self, works: List, timeout: timedelta, what: str) -> None:
        deadline = time.monotonic() + timeout.total_seconds()
        try:
            for work in works:
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
        except RuntimeError as exc:
            raise TransportError(f"pipe failed while {what}: {_reason(exc)}") from exc

    def send(self, message: Message, timeout: timedelta) -> None:
        payload = message.payload
        if isinstance(payload, torch.Tensor):
            payload = Pieces(payload.numel(), ((0, payload),) if payload.numel() else ())
        pieces = payload.pieces if payload is not None else ()
        frame = torch.tensor(
            [MAGIC, int(message.kind), len(message.header), payload_size(payload), len(pieces)], dtype=torch.int64
        )
        control = frame.numpy().tobytes()
        if pieces:
            control += payload.table().numpy().tobytes()
        control += bytes(message.header)
        first = bytearray(INLINE)
        first[: min(len(control), INLINE)] = control[:INLINE]
        # Every tensor posted stays referenced here until the waits below are over.
        tensors = [torch.frombuffer(first, dtype=torch.uint8)]
        if len(control) > INLINE:
            tensors.append(torch.frombuffer(bytearray(control[INLINE:]), dtype=torch.uint8))
        tensors.extend(piece for _, piece in pieces)
        works = [self._post(True, tensor, "sending a message") for tensor in tensors]
        self._wait(works, timeout, "sending a message")

    def recv(
        self,
        limits: Limits,
        idle: timedelta,
        transfer: timedelta,
        alloc: Callable[[int], torch.Tensor],
        progress: Optional[Callable[[int], None]] = None,
    ) -> Message:
        self._wait([self._post(False, self._first, "waiting for a message")], idle, "waiting for a message")
        kind, header_len, payload_len, count = check_frame(self._first[:_FRAME_BYTES].view(torch.int64), limits)
        control_len = _FRAME_BYTES + 16 * count + header_len
        control = self._first.numpy().tobytes()[: min(control_len, INLINE)]
        if control_len > INLINE:
            rest = torch.empty(control_len - INLINE, dtype=torch.uint8)
            self._wait([self._post(False, rest, "receiving a header")], transfer, "receiving a header")
            control += rest.numpy().tobytes()
        header = control[_FRAME_BYTES + 16 * count :]
        payload = None
        if payload_len:
            table = torch.frombuffer(bytearray(control[_FRAME_BYTES : _FRAME_BYTES + 16 * count]), dtype=torch.int64)
            rows = check_pieces(table.view(count, 2), payload_len)
            payload = alloc(payload_len)
            works = [self._post(False, payload[offset : offset + size], "receiving a payload") for offset, size in rows]
            deadline = time.monotonic() + transfer.total_seconds()
            for work, (offset, size) in zip(works, rows):
                # Pieces complete in order; check each while the next ones are still arriving.
                self._wait([work], timedelta(seconds=max(0.001, deadline - time.monotonic())), "receiving a payload")
                if progress is not None:
                    progress(offset + size)
        return Message(kind, header, payload)

    def close(self) -> None:
        try:
            self._group.shutdown()
        except RuntimeError:
            pass
