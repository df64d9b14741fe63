"""The pipe interface: one request/reply channel between the backend and one frontend.

A message is a kind, a JSON header (bytes) and an optional flat uint8 payload. On the wire it is a
fixed frame ``int64[5] = [MAGIC, kind, header bytes, payload bytes, pieces]`` followed by the header,
a piece table ``int64[pieces, 2]`` of ``(offset, bytes)`` and the pieces, so the receiver knows every
size before it receives anything and can refuse an oversized message without reading it. A sender
gives the payload as :class:`Pieces` (spans of the flat buffer that live in separate tensors, such
as a model's parameters) so it never copies them into one buffer; the receiver always gets the
flat buffer. Frontends send requests (``DOWNLOAD``, ``UPLOAD``, ``REPORT``, ``BYE``); the
backend answers each but ``BYE`` with one reply (``MODEL``, ``ACK``, ``END``). Between requests a
frontend sends ``HEARTBEAT``, which the backend echoes; while it handles a request the backend
sends ``PING`` (:mod:`openfl_api.transport.heartbeat`).

A pipe that times out or breaks is dead: :class:`~openfl_api.errors.TransportError` is raised and
the pipe must be closed. :class:`Silence` is the TransportError of a receive that timed out before
anything came: the peer hangs, or the link is cut.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from openfl_api.errors import ProtocolError, TransportError

__all__ = [
    "Kind", "Message", "Pieces", "Stream", "Limits", "Pipe", "Silence", "MAGIC", "MAX_PIECES", "REQUESTS", "REPLIES",
    "check_frame", "check_pieces", "frame_of", "payload_size",
]

MAGIC = 0x0F1A_0003  # changes with the framing, so that peers of two framings fail at the first frame
FRAME = 5  # int64 words in a frame
MAX_PIECES = 1 << 16


class Kind(enum.IntEnum):
    """What a message is."""

    DOWNLOAD = 1  #: frontend asks for a global model (header: the version it needs)
    UPLOAD = 2  #: frontend sends its update (header + payload)
    BYE = 3  #: frontend leaves; no reply
    MODEL = 4  #: backend serves a global model (header + payload)
    ACK = 5  #: backend says whether an upload was accepted
    END = 6  #: backend says the federation has ended
    PING = 7  #: backend checks that a frontend whose request it holds is still there; no reply
    REPORT = 8  #: frontend reports its evaluation of a global model (header only); answered with ACK
    HEARTBEAT = 9  #: frontend, between requests: the link is alive; the backend echoes it at once


REQUESTS = frozenset({Kind.DOWNLOAD, Kind.UPLOAD, Kind.BYE, Kind.REPORT, Kind.HEARTBEAT})
REPLIES = frozenset({Kind.MODEL, Kind.ACK, Kind.END})
_KINDS = {int(kind): kind for kind in Kind}


class Silence(TransportError):
    """Nothing came from the peer within the time a receive waited: the peer hangs, or the link
    between the two is cut. The pipe is dead, as after any TransportError."""


@dataclass(frozen=True)
class Pieces:
    """A payload of ``nbytes`` bytes given as pieces ``(offset, 1-D uint8 tensor)``.

    Offsets increase and pieces do not overlap; the bytes between pieces are padding and are not
    sent. Each piece travels as one message straight from its tensor, without a gathering copy.
    """

    nbytes: int
    pieces: Tuple[Tuple[int, torch.Tensor], ...]

    @property
    def rows(self) -> Tuple[Tuple[int, int], ...]:
        """The piece table as sent: each piece's ``(offset, bytes)``."""
        return tuple((offset, piece.numel()) for offset, piece in self.pieces)

    def flat(self) -> torch.Tensor:
        """The payload gathered into one zero-padded buffer (for pipes that copy anyway)."""
        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        end = 0
        for offset, piece in self.pieces:
            if offset > end:
                buffer[end:offset].zero_()
            end = offset + piece.numel()
            buffer[offset:end].copy_(piece)
        if end < self.nbytes:
            buffer[end:].zero_()
        return buffer


@dataclass(frozen=True)
class Stream:
    """A payload of ``nbytes`` bytes whose pieces are made one at a time, each while the ones before
    it travel (the protected wire encrypts a chunk while the previous one is sent).

    ``rows`` gives each piece's ``(offset, bytes)`` in advance, for the piece table; ``make()``
    yields the pieces in order, 1-D uint8 tensors of those sizes. ``window``: when above 0, at most
    that many pieces are on their way at once: a pipe asks for piece ``i`` only once piece
    ``i - window`` has left, so the maker may reuse a few buffers in turn.
    """

    nbytes: int
    rows: Tuple[Tuple[int, int], ...]
    make: Callable[[], Iterator[torch.Tensor]]
    window: int = 0


@dataclass
class Message:
    """One message: a kind, JSON header bytes and an optional payload.

    ``payload`` is a 1-D uint8 tensor, or :class:`Pieces` when sending; a received message always
    holds the flat buffer. ``owned``: the sender hands its payload tensor over and never touches it
    again, so a pipe that keeps payloads in memory (:attr:`Pipe.queues_sends`) may pass it on
    without a copy.
    """

    kind: Kind
    header: bytes = b""
    payload: Union[torch.Tensor, Pieces, Stream, None] = None
    owned: bool = False


def payload_size(payload: Union[torch.Tensor, Pieces, Stream, None]) -> int:
    """Bytes of a message's payload, whichever form it has."""
    if payload is None:
        return 0
    if isinstance(payload, (Pieces, Stream)):
        return payload.nbytes
    return payload.numel()


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts before reading a message: its kinds and the largest sizes."""

    kinds: frozenset
    max_header: int
    max_payload: int


def frame_of(message: Message) -> Tuple[int, int, int, int, int]:
    """The frame a message would travel with, for pipes that hand messages over in memory and
    check them with :func:`check_frame` all the same."""
    size = payload_size(message.payload)
    return MAGIC, int(message.kind), len(message.header), size, 1 if size else 0


def check_frame(frame: Union[torch.Tensor, Tuple[int, ...]], limits: Limits) -> tuple:
    """Validate a received frame (the int64 tensor, or its five ints); return
    ``(kind, header_bytes, payload_bytes, pieces)``.

    Raises:
        ProtocolError: bad magic number, unexpected kind, a size over the limits, or a piece count
            that does not fit the payload. The stream cannot be trusted after that, so the pipe
            must be closed.
    """
    magic, kind, header_len, payload_len, pieces = frame.tolist() if isinstance(frame, torch.Tensor) else frame
    if magic != MAGIC:
        raise ProtocolError(f"frame has magic {magic:#x}, expected {MAGIC:#x}: the peer does not speak openfl_api")
    known = _KINDS.get(kind)
    if known is None or known not in limits.kinds:
        raise ProtocolError(f"message kind {kind} is not expected here (expected {sorted(int(k) for k in limits.kinds)})")
    if not 0 <= header_len <= limits.max_header:
        raise ProtocolError(f"header of {header_len} bytes is over the limit of {limits.max_header}")
    if not 0 <= payload_len <= limits.max_payload:
        raise ProtocolError(f"payload of {payload_len} bytes is over the limit of {limits.max_payload}")
    if not (0 <= pieces <= MAX_PIECES and (pieces == 0) == (payload_len == 0) and pieces <= payload_len):
        raise ProtocolError(f"a payload of {payload_len} bytes cannot come in {pieces} pieces "
                            f"(1 to min(bytes, {MAX_PIECES}) pieces, none without a payload)")
    return known, header_len, payload_len, pieces


def check_pieces(table: Union[torch.Tensor, Sequence[Tuple[int, int]]], payload_len: int) -> List[Tuple[int, int]]:
    """Validate a received piece table (an ``int64[n, 2]`` tensor, or its rows); return its
    ``(offset, bytes)`` rows.

    Raises:
        ProtocolError: a piece is empty, goes backwards, overlaps the one before or ends past the
            payload.
    """
    rows = [(int(offset), int(size)) for offset, size in (table.tolist() if isinstance(table, torch.Tensor) else table)]
    end = 0
    for offset, size in rows:
        if size < 1 or offset < end or offset + size > payload_len:
            raise ProtocolError(
                f"piece ({offset}, {size}) of the piece table does not fit: pieces must be non-empty, "
                f"in order, not overlapping and within the {payload_len}-byte payload"
            )
        end = offset + size
    return rows


class Pipe(ABC):
    """One side of the channel between the backend and one frontend.

    Only one thread uses a pipe at a time, except on a pipe whose :attr:`queues_sends` is True:
    there one thread may send while another receives. ``alloc(n)`` passed to :meth:`recv` returns a 1-D uint8
    tensor of exactly ``n`` bytes to receive a payload into, so buffers can be reused. A pipe that
    already holds the bytes in a buffer of its own that nobody else uses (the in-memory pipe holds
    the sender's copy) may return that instead and not call ``alloc`` or ``progress``.
    """

    #: True when :meth:`send` only queues the message for a receiver in this process and returns
    #: at once: the backend's loop then sends its replies itself instead of handing each one to
    #: the pipe's thread (a thread switch per message saved; see ``backend._Worker.reply``).
    queues_sends: bool = False
    #: True when the two sides are separate processes, so each must hear from the other
    #: (:mod:`openfl_api.transport.heartbeat`); an in-memory pipe shares the process.
    heartbeats: bool = False
    #: How long the peer may take to take the start of a message (its control block) before the
    #: link counts as cut; None: the whole send's ``timeout``. Set by the pipe's owner.
    link: Optional[timedelta] = None

    @abstractmethod
    def send(self, message: Message, timeout: timedelta) -> None:
        """Send one message; raise TransportError if the peer is gone or it takes over ``timeout``."""

    def post(self, message: Message, timeout: timedelta) -> None:
        """Send a message without payload (a ping) without waiting until the peer takes it; a
        message sent afterwards arrives after it. Pipes that cannot send it."""
        self.send(message, timeout)

    def undelivered(self, older_than: timedelta) -> Optional[str]:
        """Why a message given to :meth:`post` is not delivered: it failed, or the peer has not
        taken it for ``older_than``; None when all is well."""
        return None

    def expect(self) -> None:
        """Get ready for the peer's next message now, before sending a request it answers at
        once, so that :meth:`recv` finds its start already on the way. Pipes that need no such
        preparation do nothing."""

    def expect_payload(self, buffer: torch.Tensor) -> None:
        """Get ready for the first piece of the peer's next payload, whichever message brings it:
        it may land in ``buffer`` (a 1-D uint8 tensor that must hold the largest payload the
        receiver's limits allow, and that nothing else may use until that payload is received),
        and :meth:`recv` moves it to the buffer from ``alloc`` if that is other memory. Pipes that
        need no such preparation do nothing."""

    @abstractmethod
    def recv(
        self,
        limits: Limits,
        idle: timedelta,
        transfer: timedelta,
        alloc: Callable[[int], torch.Tensor],
        progress: Optional[Callable[[int], None]] = None,
    ) -> Message:
        """Receive one message: wait up to ``idle`` for it to start, ``transfer`` for the rest.

        ``progress(end)``, when given, is called on this thread as the payload arrives: bytes
        ``[0, end)`` of the buffer from ``alloc`` hold their final values (gaps between pieces
        are padding), so a receiver can check them while the rest is on the wire.
        """

    def deliver_to(self, on_message: Callable[[Message], None], on_close: Callable[[str], None]) -> bool:
        """Ask the pipe to hand each message from the peer to ``on_message`` on the peer's own
        sending thread instead of keeping it for :meth:`recv`, and to call ``on_close(reason)``
        once the peer is gone; messages that came before are handed over first, on the calling
        thread. The receiver must check each message itself (:func:`frame_of`, :func:`check_frame`).

        Returns:
            False when the pipe cannot (it needs a thread of the receiver to read the wire): go on
            with :meth:`recv`. Only pipes whose two sides share a process can.
        """
        return False

    @abstractmethod
    def close(self) -> None:
        """Release the pipe; the peer's next receive fails."""
