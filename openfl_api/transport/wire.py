"""The protected wire: every message of a gloo pipe authenticated and encrypted (AES-256-GCM), with
keys from the admission handshake and sequence numbers against replays.

Keys: in the handshake (:mod:`openfl_api.transport.rendezvous`) each side sends the public half of
a fresh X25519 key pair; both MACs of the handshake cover the two public keys and the wire's mode,
so neither can be swapped or downgraded on the store. HKDF-SHA256 of the X25519 secret, salted
with the shared token and bound to the join (session, join number, both nonces), gives one key per
direction. Without the token the keys cannot be derived, and a key pair lives for one pipe.

Messages: the header travels as ``seq (8 bytes) || AES-GCM(header)``, where ``seq`` counts this
direction's messages and the associated data binds the kind, ``seq`` and the payload's size. The
payload travels in chunks of :data:`CHUNK` bytes, each sealed on its own with the nonce
``(seq, chunk)``. A sender seals each chunk on a thread of its own while its own thread writes the
chunk before to the socket (AES-GCM in ``cryptography`` holds the GIL, gloo's send releases it); a
chunk that spans several pieces of the payload is encrypted span by span, straight from the pieces.
A receiver decrypts each chunk while gloo's thread reads the ones after it. A receiver takes only
the next ``seq``; an older one is a replay, a newer one a lost message, and a message that fails
authentication (a changed byte, a wrong key) is refused. Each is a
:class:`~openfl_api.errors.WireError` and the pipe is closed: the stream can no longer be trusted.
A frontend then joins again, with fresh keys.

A receiver decrypts each chunk straight into the buffer it was given; when a chunk fails, that
buffer may hold its unauthenticated bytes and the message is refused, as when a pipe breaks in the
middle of a payload: nothing reads a refused message's buffer. Where ``cryptography`` has
``encrypt_into`` and ``decrypt_into``, a chunk is sealed and opened without a copy.

By default the wire is protected unless the pipes stay on this machine (a ``memory://`` address,
or a ``tcp://`` address on loopback): ``API(protect_wire=True)`` or ``False`` decides instead. The
backend decides for its address; a frontend with ``protect_wire=True`` refuses a plain wire.
"""

from __future__ import annotations

import bisect
import ipaddress
import queue
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch

from openfl_api.address import Address
from openfl_api.errors import ProtocolError, WireError
from openfl_api.transport.base import Limits, Message, Pieces, Pipe, Stream, payload_size

__all__ = ["CHUNK", "PROTECTED", "PLAIN", "WireKeys", "KeyExchange", "SealedPipe", "protected_by_default"]

#: Plaintext bytes per sealed chunk of a payload. Each chunk costs a gloo message, a hand-off between
#: threads and an AES-GCM set-up; 2 MiB keeps that overhead small against the crypto, while a
#: sender's ring of chunk buffers (``_WINDOW + 3`` chunks) stays at 14 MiB.
CHUNK = 1 << 21
TAG = 16
SEQ = 8
_HEADER = 0xFFFFFFFF  # the chunk number of a header's nonce
#: The wire's modes, as named in the handshake.
PROTECTED = "aes-256-gcm"
PLAIN = "plain"


def protected_by_default(address: Address) -> bool:
    """Whether the wire of ``address`` is protected when the user did not say: yes unless its
    pipes stay on this machine (``memory://``, or ``tcp://`` on a loopback host)."""
    if address.scheme == "memory":
        return False
    if address.scheme == "tcp" and address.host:
        return not _loopback(address.host)
    return True


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class WireKeys:
    """The two AES-256 keys of a pipe: ``send`` seals what this side sends, ``recv`` opens what it receives."""

    send: bytes
    recv: bytes

    def __repr__(self) -> str:  # keys never reach a log
        return "WireKeys(...)"


class KeyExchange:
    """One side's fresh X25519 key pair for one join; :meth:`keys` derives the pipe's keys."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._private = X25519PrivateKey.generate()
        #: The public key as sent in the handshake: 64 hex digits.
        self.public = self._private.public_key().public_bytes_raw().hex()

    def keys(self, peer: str, token: bytes, context: str, frontend: bool) -> WireKeys:
        """The pipe's keys from the peer's public key (hex), the shared token and the join's
        ``context`` (session, join number, nonces); ``frontend`` says which side this is."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        secret = self._private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer)))
        material = HKDF(algorithm=hashes.SHA256(), length=64, salt=token or None,
                        info=f"openfl_api wire|{context}".encode("utf-8")).derive(secret)
        upstream, downstream = material[:32], material[32:]  # frontend -> backend, backend -> frontend
        return WireKeys(upstream, downstream) if frontend else WireKeys(downstream, upstream)


def is_public_key(value: object) -> bool:
    """Whether ``value`` (read from the store) is a public key as :class:`KeyExchange` sends it."""
    if not isinstance(value, str) or len(value) != 64:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def _nonce(seq: int, chunk: int) -> bytes:
    return seq.to_bytes(SEQ, "big") + chunk.to_bytes(4, "big")


def _associated(seq: int, kind: int, nbytes: int) -> bytes:
    return b"openfl_api wire" + seq.to_bytes(SEQ, "big") + int(kind).to_bytes(1, "big") + nbytes.to_bytes(8, "big")


def sealed_rows(nbytes: int) -> Tuple[Tuple[int, int], ...]:
    """The sealed chunks' ``(offset, bytes)`` for a payload of ``nbytes`` plaintext bytes."""
    count = -(-nbytes // CHUNK)
    return tuple((i * (CHUNK + TAG), min(CHUNK, nbytes - i * CHUNK) + TAG) for i in range(count))


#: Sealed chunks of one payload on their way at once (see :class:`~openfl_api.transport.base.Stream`).
_WINDOW = 4
_ZEROS = memoryview(bytes(CHUNK))  # the padding between pieces, as sealed


def _plain_size(sealed: int) -> int:
    count = -(-sealed // (CHUNK + TAG))
    return sealed - count * TAG


class _Window:
    """Plaintext windows ``[start, end)`` of a payload as consecutive spans: views of the pieces,
    and zeros for the padding between them (no bytes are gathered)."""

    def __init__(self, payload: Union[torch.Tensor, Pieces]) -> None:
        if isinstance(payload, torch.Tensor):
            payload = Pieces(payload.numel(), ((0, payload),))
        self._pieces = payload.pieces
        self._offsets = [offset for offset, _ in self._pieces]

    def __call__(self, start: int, end: int) -> List[memoryview]:
        spans: List[memoryview] = []
        at = start
        for offset, piece in self._pieces[max(bisect.bisect_right(self._offsets, start) - 1, 0):]:
            if offset >= end:
                break
            low, high = max(at, offset), min(end, offset + piece.numel())
            if low >= high:
                continue
            if low > at:
                spans.append(_ZEROS[: low - at])
            spans.append(memoryview(piece[low - offset : high - offset].numpy()))
            at = high
        if at < end:
            spans.append(_ZEROS[: end - at])
        return spans


def _ahead(make: Callable[[int], torch.Tensor], count: int) -> Iterator[torch.Tensor]:
    """``make(0)``, ..., ``make(count - 1)``, made on a thread of their own at most two past the one
    the caller took last (one waiting in the queue, one being made): AES-GCM holds the GIL, gloo's
    send does not, so a chunk is sealed while the caller writes the one before it to the socket."""
    ready: "queue.Queue[object]" = queue.Queue(maxsize=1)  # full: the sealing thread waits without the GIL
    stop = threading.Event()

    def hand(item: object) -> None:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for index in range(count):
                if stop.is_set():
                    return
                hand(make(index))
        except BaseException as exc:  # handed to the caller, who raises it
            hand(exc)

    thread = threading.Thread(target=work, name="openfl-seal", daemon=True)
    thread.start()
    try:
        for _ in range(count):
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


class SealedPipe(Pipe):
    """A gloo pipe whose messages are sealed with :class:`WireKeys` (see the module's docstring).

    Args:
        inner: the gloo pipe (:class:`~openfl_api.transport.gloo.GlooPipe`) that carries the sealed messages.
        keys: this side's keys.
    """

    heartbeats = True

    def __init__(self, inner: Pipe, keys: WireKeys) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._inner = inner
        self._send_key = keys.send
        self._seal_with = AESGCM(keys.send)
        self._open_with = AESGCM(keys.recv)
        self._lock = threading.Lock()  # a message's seq and its place on the wire go together
        self._next_send = 0
        self._next_recv = 0
        self._sealed = torch.empty(0, dtype=torch.uint8)
        # The sealed chunks of a payload of several, in turn: at most _WINDOW + 2 are in use (the
        # pipe's window, ending with the chunk it took last, and two the sealing thread makes
        # past that one: see _ahead); one more is spare.
        self._ring: List[torch.Tensor] = []
        self._into = hasattr(self._seal_with, "encrypt_into")

    @property
    def link(self) -> Optional[timedelta]:  # type: ignore[override]
        return self._inner.link

    @link.setter
    def link(self, value: Optional[timedelta]) -> None:
        self._inner.link = value

    # ----------------------------------------------------------------- sending
    def send(self, message: Message, timeout: timedelta) -> None:
        with self._lock:
            self._inner.send(self._seal(message), timeout)

    def post(self, message: Message, timeout: timedelta) -> None:
        with self._lock:
            self._inner.post(self._seal(message), timeout)

    def undelivered(self, older_than: timedelta) -> Optional[str]:
        return self._inner.undelivered(older_than)

    def expect(self) -> None:
        self._inner.expect()  # a sealed message starts with the inner pipe's control message

    def _seal(self, message: Message) -> Message:
        seq, self._next_send = self._next_send, self._next_send + 1
        nbytes = payload_size(message.payload)
        header = seq.to_bytes(SEQ, "big") + self._seal_with.encrypt(
            _nonce(seq, _HEADER), bytes(message.header), _associated(seq, message.kind, nbytes))
        if not nbytes:
            return Message(message.kind, header)
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        rows = sealed_rows(nbytes)
        if len(rows) > 1 and not self._ring:
            self._ring = [torch.empty(CHUNK + TAG, dtype=torch.uint8) for _ in range(_WINDOW + 3)]
        ring = self._ring if len(rows) > 1 else []
        window, seal, into, key = _Window(message.payload), self._seal_with, self._into, self._send_key

        def sealed(chunk: int) -> torch.Tensor:
            start = chunk * CHUNK
            spans = window(start, min(nbytes, start + CHUNK))
            nonce = _nonce(seq, chunk)
            if not into:
                plain = spans[0] if len(spans) == 1 else b"".join(spans)
                return torch.frombuffer(bytearray(seal.encrypt(nonce, plain, None)), dtype=torch.uint8)
            out = ring[chunk % len(ring)][: rows[chunk][1]] if ring else torch.empty(rows[chunk][1], dtype=torch.uint8)
            view = memoryview(out.numpy())
            if len(spans) == 1:
                seal.encrypt_into(nonce, spans[0], None, view)
                return out
            # The same AES-GCM over spans in turn: each is encrypted straight into its place.
            encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
            at = 0
            for span in spans:  # update_into wants 15 spare bytes past the span: the tag's room has them
                encryptor.update_into(span, view[at : at + len(span) + 15])
                at += len(span)
            encryptor.finalize()
            view[at:] = encryptor.tag
            return out

        if len(rows) == 1:
            return Message(message.kind, header, Stream(rows[0][1], rows, lambda: iter([sealed(0)])))
        return Message(message.kind, header, Stream(rows[-1][0] + rows[-1][1], rows,
                                                    lambda: _ahead(sealed, len(rows)), _WINDOW))

    # ----------------------------------------------------------------- receiving
    def recv(
        self,
        limits: Limits,
        idle: timedelta,
        transfer: timedelta,
        alloc: Callable[[int], torch.Tensor],
        progress: Optional[Callable[[int], None]] = None,
    ) -> Message:
        from cryptography.exceptions import InvalidTag

        sealed_limit = limits.max_payload + TAG * -(-limits.max_payload // CHUNK)
        outer = Limits(limits.kinds, limits.max_header + SEQ + TAG, sealed_limit)
        kind, header, rows, sealed = self._inner.recv_control(outer, idle, transfer)
        if len(header) < SEQ + TAG:
            raise WireError(f"a {kind.name} message came without its seal ({len(header)} header bytes)",
                            "failed authentication")
        seq = int.from_bytes(header[:SEQ], "big")
        if seq < self._next_recv:
            raise WireError(f"message {seq} came again (message {self._next_recv} was due): a replay", "replayed")
        if seq > self._next_recv:
            raise WireError(f"message {seq} came where message {self._next_recv} was due", "out of order")
        nbytes = _plain_size(sealed)
        try:
            plain_header = self._open_with.decrypt(_nonce(seq, _HEADER), header[SEQ:],
                                                   _associated(seq, kind, nbytes))
        except InvalidTag:
            raise WireError(f"message {seq} ({kind.name}) failed authentication: a changed byte, or a peer "
                            "with another key", "failed authentication") from None
        if tuple(rows) != sealed_rows(nbytes):
            raise WireError(f"message {seq} came with a piece table of another layout", "failed authentication")
        self._next_recv += 1
        if nbytes > limits.max_payload:
            raise ProtocolError(f"payload of {nbytes} bytes is over the limit of {limits.max_payload}")
        if not nbytes:
            return Message(kind, plain_header)
        payload = alloc(nbytes)
        if self._sealed.numel() < sealed:
            self._sealed = torch.empty(sealed, dtype=torch.uint8)
        sealed_view, plain_view = memoryview(self._sealed.numpy()), memoryview(payload.numpy())
        opened = [0]

        def open_chunks(end: int) -> None:
            while opened[0] < len(rows) and sum(rows[opened[0]]) <= end:
                chunk = opened[0]
                offset, size = rows[chunk]
                start, end = chunk * CHUNK, chunk * CHUNK + size - TAG
                try:
                    if self._into:
                        self._open_with.decrypt_into(_nonce(seq, chunk), sealed_view[offset : offset + size], None,
                                                     plain_view[start:end])
                    else:
                        plain_view[start:end] = self._open_with.decrypt(
                            _nonce(seq, chunk), sealed_view[offset : offset + size], None)
                except InvalidTag:
                    raise WireError(f"chunk {chunk} of message {seq} ({kind.name}) failed authentication: a "
                                    "changed byte", "failed authentication") from None
                opened[0] += 1
                if progress is not None:
                    progress(end)

        self._inner.recv_payload(rows, self._sealed, transfer, open_chunks)
        return Message(kind, plain_header, payload)

    def close(self) -> None:
        self._inner.close()
