"""The pipe interface: one request/reply channel between the backend and one frontend.

A message is a kind, a JSON header (bytes) and an optional flat uint8 payload. On the wire it is a
fixed frame ``int64[4] = [MAGIC, kind, header bytes, payload bytes]`` followed by the header and the
payload, so the receiver knows every size before it receives anything and can refuse an oversized
message without reading it. Frontends send requests (``DOWNLOAD``, ``UPLOAD``, ``BYE``); the
backend answers each with one reply (``MODEL``, ``ACK``, ``END``).

A pipe that times out or breaks is dead: :class:`~openfl_api.errors.TransportError` is raised and
the pipe must be closed.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch

from openfl_api.errors import ProtocolError, TransportError

__all__ = ["Kind", "Message", "Limits", "Pipe", "MAGIC", "REQUESTS", "REPLIES", "check_frame"]

MAGIC = 0x0F1A_0001


class Kind(enum.IntEnum):
    """What a message is."""

    DOWNLOAD = 1  #: frontend asks for a global model (header: the version it needs)
    UPLOAD = 2  #: frontend sends its update (header + payload)
    BYE = 3  #: frontend leaves; no reply
    MODEL = 4  #: backend serves a global model (header + payload)
    ACK = 5  #: backend says whether an upload was accepted
    END = 6  #: backend says the federation has ended
    PING = 7  #: backend checks that a frontend whose request it holds is still there; no reply


REQUESTS = frozenset({Kind.DOWNLOAD, Kind.UPLOAD, Kind.BYE})
REPLIES = frozenset({Kind.MODEL, Kind.ACK, Kind.END})


@dataclass
class Message:
    """One message: a kind, JSON header bytes and an optional 1-D uint8 payload."""

    kind: Kind
    header: bytes = b""
    payload: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts before reading a message: its kinds and the largest sizes."""

    kinds: frozenset
    max_header: int
    max_payload: int


def check_frame(frame: torch.Tensor, limits: Limits) -> tuple:
    """Validate a received frame; return ``(kind, header_bytes, payload_bytes)``.

    Raises:
        ProtocolError: bad magic number, unexpected kind or a size over the limits. The stream
            cannot be trusted after that, so the pipe must be closed.
    """
    magic, kind, header_len, payload_len = (int(v) for v in frame.tolist())
    if magic != MAGIC:
        raise ProtocolError(f"frame has magic {magic:#x}, expected {MAGIC:#x}: the peer does not speak openfl_api")
    if kind not in {int(k) for k in limits.kinds}:
        raise ProtocolError(f"message kind {kind} is not expected here (expected {sorted(int(k) for k in limits.kinds)})")
    if not 0 <= header_len <= limits.max_header:
        raise ProtocolError(f"header of {header_len} bytes is over the limit of {limits.max_header}")
    if not 0 <= payload_len <= limits.max_payload:
        raise ProtocolError(f"payload of {payload_len} bytes is over the limit of {limits.max_payload}")
    return Kind(kind), header_len, payload_len


class Pipe(ABC):
    """One side of the channel between the backend and one frontend.

    Only one thread uses a pipe at a time. ``alloc(n)`` passed to :meth:`recv` returns a 1-D uint8
    tensor of exactly ``n`` bytes to receive a payload into, so buffers can be reused.
    """

    @abstractmethod
    def send(self, message: Message, timeout: timedelta) -> None:
        """Send one message; raise TransportError if the peer is gone or it takes over ``timeout``."""

    @abstractmethod
    def recv(
        self,
        limits: Limits,
        idle: timedelta,
        transfer: timedelta,
        alloc: Callable[[int], torch.Tensor],
    ) -> Message:
        """Receive one message: wait up to ``idle`` for it to start, ``transfer`` for the rest."""

    @abstractmethod
    def close(self) -> None:
        """Release the pipe; the peer's next receive fails."""
