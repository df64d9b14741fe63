"""Pipes over a two-rank ``ProcessGroupGloo`` built on a ``PrefixStore`` of the address's store.

Only public torch API is used: ``ProcessGroupGloo(store, rank, 2, options)`` and its
``send``/``recv``. Gloo reports a peer that crashed at once (the TCP connection closes); a receive
that times out closes the pair, which is why a pipe that timed out is dead.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store

from openfl_api.errors import TransportError
from openfl_api.transport.interfaces import IFNAME_VAR, binding
from openfl_api.transport.base import (
    FRAME, MAGIC, Kind, Limits, Message, Pieces, Pipe, Silence, Stream, check_frame, check_pieces, payload_size,
)
from openfl_api.waiting import seconds

__all__ = ["GlooPipe", "open_gloo_pipe"]

_TAG = 0  # control messages
_PIECE_TAG = 1  # a payload's pieces: a receive posted ahead for them never takes a control message


def _reason(exc: BaseException) -> str:
    """Gloo's error, as a log line can say it: its first line without the C++ source location and
    the generic advice gloo appends."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically caused")[0].strip()[:300]


_devices: Dict[Tuple[int, Optional[str], Optional[str]], Any] = {}
_devices_lock = threading.Lock()


def _device(bound: Any) -> Any:
    """The gloo device of this process for ``bound``'s interface or host name, made on first use.

    Every pipe on one binding shares it: a gloo device runs one loop thread, which reads what
    arrives on all of its pipes' sockets and wakes every 10 ms even when nothing arrives, so a
    backend with a device per pipe would run as many such threads as it has frontends.
    """
    key = (os.getpid(), bound.interface, None if bound.interface else bound.hostname)  # a forked child makes its own
    with _devices_lock:
        device = _devices.get(key)
        if device is None:
            try:
                device = (ProcessGroupGloo.create_device(interface=bound.interface) if bound.interface
                          else ProcessGroupGloo.create_device(hostname=bound.hostname))
            except RuntimeError as exc:
                raise TransportError(f"could not open a pipe on {bound}: {_reason(exc)}; set {IFNAME_VAR} to an "
                                     "interface of this machine that reaches the other side") from exc
            _devices[key] = device
        return device


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
    options._devices = [_device(bound)]
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
#: when they fit (every control message and the header of most models), else the rest follows. A
#: payload that fits after them travels in it too (see :class:`GlooPipe`).
INLINE = 32 * 1024
_FRAME_BYTES = FRAME * 8
# The frame's five int64 words and a piece table's (offset, bytes) rows, as they travel: the
# native byte order of both sides (int64 tensors, as every gloo peer of this library writes them).
_WORDS = struct.Struct(f"={FRAME}q")


def _table(rows) -> bytes:
    """A piece table's bytes: its ``(offset, bytes)`` rows as int64 pairs."""
    return struct.pack(f"={2 * len(rows)}q", *itertools.chain.from_iterable(rows))


def _inline(control: bytes, size: int, rows, pieces) -> bytearray:
    """A control block followed by a payload of ``size`` bytes (its pieces at their rows' offsets,
    zeros between them): the bytes of a first gloo message that carries both."""
    block = bytearray(len(control) + size)
    block[: len(control)] = control
    for (offset, length), piece in zip(rows, pieces):
        start = len(control) + offset
        block[start : start + length] = memoryview((piece if piece.is_cpu else piece.cpu()).contiguous().numpy())
    return block


class GlooPipe(Pipe):
    """A pipe over a two-rank gloo process group.

    A message is sent as one control message of at most :data:`INLINE` bytes (the frame, then the
    piece table, then the header), the overflow of that control block when it is larger, and the
    payload's pieces. Sends are posted together and waited once; the receiver posts a receive of
    :data:`INLINE` bytes for the control message (a shorter message fills its start), checks the
    frame, and posts every piece at once. On loopback each separately waited gloo operation costs
    a thread hand-off, hence so few of them.

    A gloo send leaves only once the receiver has posted its receive, and the receiver posts the
    pieces' receives only once it has read the sizes in the control message: a payload in pieces
    costs one round trip more than its control message. So a payload that fits in the control
    message after the control block (``control + payload bytes <= INLINE``, which both sides
    compute from the frame) travels inside it, padding included, and costs no round trip of its
    own: every control message and the models and updates of small networks.

    Sends are serialised by a lock, so one thread may send (a heartbeat, a ping) while another is
    blocked in a receive. A gloo send completes once the peer has posted the matching receive.
    """

    heartbeats = True

    def __init__(self, group: ProcessGroupGloo, peer: int) -> None:
        self._group = group
        self._peer = peer
        self._first = torch.zeros(INLINE, dtype=torch.uint8)
        self._first_bytes = memoryview(self._first.numpy())  # the same memory, read without torch calls
        self._inline: Optional[torch.Tensor] = None  # the payload that came inside the control message
        self._send_lock = threading.Lock()
        self._first_work: Any = None  # the receive of the next message's start, when posted ahead (expect)
        self._piece_work: Any = None  # (work, buffer): the receive of the next payload's first piece (expect_payload)
        self._posted: List[Tuple[Any, torch.Tensor, float]] = []  # (work, tensor kept alive, posted at)

    def _post(self, send: bool, tensor: torch.Tensor, what: str, tag: int = _TAG):
        try:
            if send:
                return self._group.send([tensor], self._peer, tag)
            return self._group.recv([tensor], self._peer, tag)
        except RuntimeError as exc:
            raise TransportError(f"pipe failed while {what}: {_reason(exc)}") from exc

    def _wait(self, works: List, timeout: timedelta, what: str) -> None:
        deadline = time.monotonic() + timeout.total_seconds()
        try:
            for work in works:
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
        except RuntimeError as exc:
            raise TransportError(f"pipe failed while {what}: {_reason(exc)}") from exc

    def _wait_first(self, work: object, idle: timedelta) -> None:
        """Wait for a message to start; :class:`Silence` when nothing came within ``idle``."""
        started = time.monotonic()
        try:
            work.wait(idle)
        except RuntimeError as exc:
            first = _reason(exc)
            if "Timed out" in first or time.monotonic() - started >= idle.total_seconds():
                raise Silence(f"pipe failed: nothing came for {seconds(idle.total_seconds())}, not even a "
                              "heartbeat (the link is cut, or the peer hangs)") from exc
            raise TransportError(f"pipe failed while waiting for a message: {first}") from exc

    def expect(self) -> None:
        # Posted before the request goes out, the receive of its answer is in place when the
        # answer comes: gloo's loop thread then takes it into ``_first`` at once. Posted after, the
        # answer that is already waiting is announced first and the receive is posted while the
        # loop thread wants the same pair's lock to read it; gloo's loop retries a locked pair at
        # once, so it spins for as long as the posting thread is held up (on a loaded machine,
        # often a whole time slice).
        if self._first_work is None:
            self._first_work = self._post(False, self._first, "waiting for a message")

    def expect_payload(self, buffer: torch.Tensor) -> None:
        # The first piece of a payload is announced by the sender as soon as it is posted, so a
        # receive posted once the control message has given its size would be taken at once, with
        # the spin described in expect(). Posted ahead, on the pieces' own tag, it waits for the
        # next payload whatever comes before it; recv_payload copies the piece into place when the
        # payload's buffer is not this one.
        if self._piece_work is None:
            self._piece_work = (self._post(False, buffer, "waiting for a payload", _PIECE_TAG), buffer)

    def send(self, message: Message, timeout: timedelta) -> None:
        with self._send_lock:
            self._send(message, timeout)

    def post(self, message: Message, timeout: timedelta) -> None:
        if message.payload is not None:
            raise ValueError("post() takes messages without payload")
        with self._send_lock:
            self._prune()
            tensor = torch.frombuffer(bytearray(self._control(message, ())), dtype=torch.uint8)
            self._posted.append((self._post(True, tensor, "sending a ping"), tensor, time.monotonic()))

    def _prune(self) -> None:
        self._posted = [item for item in self._posted if not item[0].is_completed()]

    def undelivered(self, older_than: timedelta) -> Optional[str]:
        # A gloo send is marked complete only by a wait, and a wait that times out fails it: so a
        # ping is waited (briefly) only once it is older than ``older_than`` and must be through.
        with self._send_lock:
            now = time.monotonic()
            young = []
            for item in self._posted:
                work, _, posted = item
                if now - posted <= older_than.total_seconds():
                    young.append(item)
                    continue
                try:
                    work.wait(timedelta(milliseconds=1))
                except RuntimeError as exc:
                    if "Timed out" not in _reason(exc):
                        return "pipe failed while sending a ping: the connection to the frontend broke"
                    return (f"pipe failed: the frontend took no ping for {seconds(now - posted)} (the link is cut, "
                            "or the frontend hangs)")
            self._posted = young
        return None

    def _control(self, message: Message, rows) -> bytes:
        """The frame, the piece table (``rows``) and the header of a message, as sent in its control block."""
        frame = _WORDS.pack(MAGIC, int(message.kind), len(message.header), payload_size(message.payload), len(rows))
        return frame + _table(rows) + bytes(message.header) if rows else frame + bytes(message.header)

    def _send(self, message: Message, timeout: timedelta) -> None:
        payload = message.payload
        if isinstance(payload, torch.Tensor):
            payload = Pieces(payload.numel(), ((0, payload),) if payload.numel() else ())
        if isinstance(payload, Stream):
            rows, pieces = payload.rows, payload.make()
        elif payload is not None and payload.pieces:
            rows, pieces = payload.rows, (piece for _, piece in payload.pieces)
        else:
            rows, pieces = (), iter(())
        control = self._control(Message(message.kind, message.header, payload), rows)
        size = payload_size(payload)
        if size and len(control) + size <= INLINE:
            control = _inline(control, size, rows, pieces)
            pieces = iter(())
        # Every tensor posted stays referenced here until the waits below are over.
        if len(control) <= INLINE:
            tensors = [torch.frombuffer(bytearray(control), dtype=torch.uint8)]
        else:
            tensors = [torch.frombuffer(bytearray(control[:INLINE]), dtype=torch.uint8),
                       torch.frombuffer(bytearray(control[INLINE:]), dtype=torch.uint8)]
        works = [self._post(True, tensor, "sending a message") for tensor in tensors]
        controls, waited = len(works), 0  # works[:waited] are through
        deadline = time.monotonic() + timeout.total_seconds()

        def through(end: int) -> None:
            nonlocal waited
            if waited == 0 and self.link is not None and self.link < timeout:
                # The peer takes a message's start at once when it is there: waiting longer is a cut link.
                # (Each work is waited once: a second wait of a gloo send waits for another send.)
                try:
                    works[0].wait(self.link)
                except RuntimeError as exc:
                    raise Silence(f"pipe failed: the peer took no message for {seconds(self.link.total_seconds())} "
                                  "(the link is cut, or the peer hangs)") from exc
                waited = 1
            if end > waited:
                self._wait(works[waited:end], timedelta(seconds=max(0.001, deadline - time.monotonic())),
                           "sending a message")
                waited = end

        window = payload.window if isinstance(payload, Stream) else 0
        try:
            for index in itertools.count():
                if window and index >= window:
                    through(controls + index - window + 1)  # piece ``index - window`` is through
                piece = next(pieces, None)  # a Stream makes each piece while the ones posted before it travel
                if piece is None:
                    break
                tensors.append(piece)
                works.append(self._post(True, piece, "sending a message", _PIECE_TAG))
        finally:
            getattr(pieces, "close", lambda: None)()  # a Stream's maker stops when the send fails
        through(len(works))

    def recv(
        self,
        limits: Limits,
        idle: timedelta,
        transfer: timedelta,
        alloc: Callable[[int], torch.Tensor],
        progress: Optional[Callable[[int], None]] = None,
    ) -> Message:
        kind, header, rows, payload_len = self.recv_control(limits, idle, transfer)
        payload = None
        if payload_len:
            payload = alloc(payload_len)
            self.recv_payload(rows, payload, transfer, progress)
        return Message(kind, header, payload)

    def recv_control(self, limits: Limits, idle: timedelta,
                     transfer: timedelta) -> Tuple[Kind, bytes, List[Tuple[int, int]], int]:
        """The first half of :meth:`recv`: a message's kind, header, piece rows ``(offset, bytes)``
        and payload size, checked against ``limits``; its payload follows (:meth:`recv_payload`)."""
        self._inline = None
        work, self._first_work = self._first_work, None
        self._wait_first(work if work is not None else self._post(False, self._first, "waiting for a message"), idle)
        first = self._first_bytes
        kind, header_len, payload_len, count = check_frame(_WORDS.unpack_from(first), limits)
        control_len = _FRAME_BYTES + 16 * count + header_len
        control = first[: min(control_len, INLINE)].tobytes()
        if payload_len and control_len + payload_len <= INLINE:
            self._inline = torch.frombuffer(bytearray(first[control_len : control_len + payload_len]), dtype=torch.uint8)
        if control_len > INLINE:
            rest = torch.empty(control_len - INLINE, dtype=torch.uint8)
            self._wait([self._post(False, rest, "receiving a header")], transfer, "receiving a header")
            control += rest.numpy().tobytes()
        header = control[_FRAME_BYTES + 16 * count :]
        rows: List[Tuple[int, int]] = []
        if payload_len:
            words = struct.unpack_from(f"={2 * count}q", control, _FRAME_BYTES)
            rows = check_pieces(list(zip(words[0::2], words[1::2])), payload_len)
        return kind, header, rows, payload_len

    def recv_payload(self, rows: List[Tuple[int, int]], payload: torch.Tensor, transfer: timedelta,
                     progress: Optional[Callable[[int], None]] = None) -> None:
        """The second half of :meth:`recv`: the pieces ``rows`` into ``payload``; ``progress(end)``
        after each piece, while the next ones are still arriving."""
        inline, self._inline = self._inline, None
        if inline is not None:
            for offset, size in rows:
                payload[offset : offset + size].copy_(inline[offset : offset + size])
                if progress is not None:
                    progress(offset + size)
            return
        ahead, self._piece_work = self._piece_work, None
        works = [] if ahead is None else [ahead[0]]
        works += [self._post(False, payload[offset : offset + size], "receiving a payload", _PIECE_TAG)
                  for offset, size in rows[len(works):]]
        deadline = time.monotonic() + transfer.total_seconds()
        for index, (work, (offset, size)) in enumerate(zip(works, rows)):
            self._wait([work], timedelta(seconds=max(0.001, deadline - time.monotonic())), "receiving a payload")
            if index == 0 and ahead is not None:
                landed = ahead[1][:size]
                target = payload[offset : offset + size]
                if landed.data_ptr() != target.data_ptr():
                    target.copy_(landed)
            if progress is not None:
                progress(offset + size)

    def close(self) -> None:
        try:
            self._group.shutdown()
        except RuntimeError:
            pass
