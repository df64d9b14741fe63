"""Pipes over a two-rank ``ProcessGroupGloo`` built on a ``PrefixStore`` of the address's store.

Only public torch API is used: ``ProcessGroupGloo(store, rank, 2, options)`` and its
``send``/``recv``. Gloo reports a peer that crashed at once (the TCP connection closes); a receive
that times out closes the pair, which is why a pipe that timed out is dead.
"""

from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta
from typing import Callable, Optional

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store

from openfl_api.errors import TransportError
from openfl_api.transport.base import MAGIC, Limits, Message, Pipe, check_frame

__all__ = ["GlooPipe", "open_gloo_pipe"]

_TAG = 0


def _is_loopback(host: Optional[str]) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def open_gloo_pipe(store: Store, prefix: str, rank: int, timeout: timedelta, host: Optional[str]) -> "GlooPipe":
    """Build this side (rank 0: backend, 1: frontend) of a pipe; blocks until both sides are up.

    Args:
        store: the address's store (the control plane).
        prefix: a key prefix unique to this pipe.
        rank: 0 on the backend, 1 on the frontend.
        timeout: how long to wait for the other side to build its half.
        host: the tcp host of the address; on loopback both sides bind to 127.0.0.1, otherwise
            gloo's default device is used (``GLOO_SOCKET_IFNAME`` chooses the interface).
    """
    options = ProcessGroupGloo._Options()
    if _is_loopback(host):
        options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    else:
        options._devices = [ProcessGroupGloo.create_default_device()]
    options._timeout = timeout
    try:
        group = ProcessGroupGloo(PrefixStore(prefix, store), rank, 2, options)
    except RuntimeError as exc:
        raise TransportError(f"could not build the gloo pipe {prefix!r}: {exc}") from exc
    return GlooPipe(group, peer=1 - rank)


class GlooPipe(Pipe):
    """A pipe over a two-rank gloo process group."""

    def __init__(self, group: ProcessGroupGloo, peer: int) -> None:
        self._group = group
        self._peer = peer
        self._frame = torch.zeros(4, dtype=torch.int64)

    def _wait(self, work, timeout: timedelta, what: str) -> None:
        try:
            work.wait(timeout)
        except RuntimeError as exc:
            raise TransportError(f"pipe failed while {what}: {str(exc).splitlines()[0][:300]}") from exc

    def _send_tensor(self, tensor: torch.Tensor, timeout: timedelta, what: str) -> None:
        try:
            work = self._group.send([tensor], self._peer, _TAG)
        except RuntimeError as exc:
            raise TransportError(f"pipe failed while {what}: {str(exc).splitlines()[0][:300]}") from exc
        self._wait(work, timeout, what)

    def _recv_tensor(self, tensor: torch.Tensor, timeout: timedelta, what: str) -> None:
        try:
            work = self._group.recv([tensor], self._peer, _TAG)
        except RuntimeError as exc:
            raise TransportError(f"pipe failed while {what}: {str(exc).splitlines()[0][:300]}") from exc
        self._wait(work, timeout, what)

    def send(self, message: Message, timeout: timedelta) -> None:
        payload = message.payload
        frame = torch.tensor(
            [MAGIC, int(message.kind), len(message.header), 0 if payload is None else payload.numel()],
            dtype=torch.int64,
        )
        self._send_tensor(frame, timeout, "sending a frame")
        if message.header:
            header = torch.frombuffer(bytearray(message.header), dtype=torch.uint8)
            self._send_tensor(header, timeout, "sending a header")
        if payload is not None and payload.numel():
            self._send_tensor(payload, timeout, "sending a payload")

    def recv(
        self,
        limits: Limits,
        idle: timedelta,
        transfer: timedelta,
        alloc: Callable[[int], torch.Tensor],
    ) -> Message:
        self._recv_tensor(self._frame, idle, "waiting for a message")
        kind, header_len, payload_len = check_frame(self._frame, limits)
        header = b""
        if header_len:
            raw = torch.empty(header_len, dtype=torch.uint8)
            self._recv_tensor(raw, transfer, "receiving a header")
            header = raw.numpy().tobytes()
        payload = None
        if payload_len:
            payload = alloc(payload_len)
            self._recv_tensor(payload, transfer, "receiving a payload")
        return Message(kind, header, payload)

    def close(self) -> None:
        try:
            self._group.shutdown()
        except RuntimeError:
            pass
