"""Tests of the protected wire over a real gloo pipe on loopback (both sides in this process):
messages arrive whole, and a changed byte, a replay, a message out of order and a wrong key are
each refused with their reason."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import List, Optional, Tuple

import pytest
import torch

from openfl_api.address import Address
from openfl_api.errors import TransportError, WireError
from openfl_api.transport.base import REPLIES, REQUESTS, Kind, Limits, Message, Pieces
from openfl_api.transport.wire import CHUNK, KeyExchange, SealedPipe, WireKeys, protected_by_default
from test_transport import TIMEOUT, pipes, zeros  # noqa: F401 - pipes is a fixture

LIMITS = Limits(REQUESTS | REPLIES, max_header=1 << 16, max_payload=4 * CHUNK)


def key_pair() -> Tuple[WireKeys, WireKeys]:
    """(backend's keys, frontend's keys) of one join."""
    backend, frontend = KeyExchange(), KeyExchange()
    return (backend.keys(frontend.public, b"token", "session|1", frontend=False),
            frontend.keys(backend.public, b"token", "session|1", frontend=True))


@pytest.fixture
def sealed(pipes):  # noqa: F811
    """(backend side, frontend side, the frontend's inner gloo pipe) of one protected pipe."""
    backend_keys, frontend_keys = key_pair()
    backend, frontend = pipes
    return SealedPipe(backend, backend_keys), SealedPipe(frontend, frontend_keys), frontend


class Tap:
    """Wraps a gloo pipe's send to record (and optionally alter) the sealed messages it carries."""

    def __init__(self, inner, alter=None) -> None:
        self.sent: List[Message] = []
        self._send = inner.send
        self._alter = alter
        inner.send = self

    def __call__(self, message: Message, timeout) -> None:
        self.sent.append(message)
        self._send(self._alter(message) if self._alter else message, timeout)


def send_on_thread(pipe, message: Message) -> threading.Thread:
    thread = threading.Thread(target=pipe.send, args=(message, TIMEOUT), daemon=True)
    thread.start()
    return thread


def exchange(sender, receiver, message: Message, alloc=zeros, progress=None) -> Message:
    thread = send_on_thread(sender, message)
    try:
        return receiver.recv(LIMITS, TIMEOUT, TIMEOUT, alloc, progress)
    except WireError:
        receiver.close()  # the pipe is dead: its owner closes it
        raise
    finally:
        thread.join(TIMEOUT.total_seconds())


def test_both_sides_derive_the_same_key_per_direction_and_none_from_another_token() -> None:
    backend, frontend = KeyExchange(), KeyExchange()
    backend_keys = backend.keys(frontend.public, b"token", "ctx", frontend=False)
    frontend_keys = frontend.keys(backend.public, b"token", "ctx", frontend=True)
    assert (backend_keys.send, backend_keys.recv) == (frontend_keys.recv, frontend_keys.send)
    assert backend_keys.send != backend_keys.recv
    assert frontend.keys(backend.public, b"other", "ctx", frontend=True).send != frontend_keys.send


@pytest.mark.parametrize("init_method,protected", [
    ("tcp://127.0.0.1:1234", False), ("tcp://localhost:1234", False), ("memory://x", False),
    ("tcp://10.1.2.3:1234", True), ("file:///tmp/store", True),
])
def test_the_wire_is_protected_by_default_unless_the_address_stays_on_this_machine(init_method, protected) -> None:
    assert protected_by_default(Address(init_method=init_method, world_size=2, rank=0)) is protected


def test_a_payload_of_several_chunks_with_gaps_arrives_whole_and_reports_progress(sealed) -> None:
    backend, frontend, _ = sealed
    first = torch.randint(0, 256, (CHUNK + 5,), dtype=torch.uint8)
    second = torch.randint(0, 256, (CHUNK // 2,), dtype=torch.uint8)
    payload = Pieces(3 * CHUNK, ((3, first), (2 * CHUNK, second)))
    ends: List[int] = []
    received = exchange(frontend, backend, Message(Kind.UPLOAD, b'{"v": 1}', payload), progress=ends.append)
    assert (received.kind, received.header) == (Kind.UPLOAD, b'{"v": 1}')
    assert torch.equal(received.payload, payload.flat())
    assert ends == [CHUNK, 2 * CHUNK, 3 * CHUNK]
    # And the other way, a second message of each direction.
    reply = exchange(backend, frontend, Message(Kind.MODEL, b"{}", torch.arange(100, dtype=torch.uint8)))
    assert reply.payload.tolist() == list(range(100))


def test_payloads_of_many_chunks_arrive_whole_though_the_sender_seals_them_into_a_few_buffers(sealed) -> None:
    backend, frontend, _ = sealed
    for seed in range(2):  # the second message reuses the first one's buffers
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(0, 256, (5 * CHUNK + 3,), dtype=torch.uint8, generator=generator)
        second = torch.randint(0, 256, (6 * CHUNK + 100,), dtype=torch.uint8, generator=generator)
        payload = Pieces(12 * CHUNK, ((0, first), (5 * CHUNK + 8, second)))
        sender = send_on_thread(frontend, Message(Kind.UPLOAD, b"{}", payload))
        time.sleep(0.2)  # the sender fills its window before the receiver takes anything
        received = backend.recv(Limits(REQUESTS, 64, 12 * CHUNK), TIMEOUT, TIMEOUT, zeros)
        sender.join(TIMEOUT.total_seconds())
        assert torch.equal(received.payload, payload.flat())


def test_a_send_that_fails_midway_stops_its_sealing_thread(sealed) -> None:
    backend, frontend, _ = sealed
    backend.close()
    with pytest.raises(TransportError) as caught:
        frontend.send(Message(Kind.UPLOAD, b"{}", torch.ones(12 * CHUNK, dtype=torch.uint8)), timedelta(seconds=1))
    # Stopped by the failed send itself, not later by the collection of its frames (which ``caught`` keeps).
    assert caught.traceback and not [thread for thread in threading.enumerate() if thread.name == "openfl-seal"]


def test_a_changed_byte_of_a_payload_is_refused(sealed) -> None:
    backend, frontend, inner = sealed

    def flip(message: Message) -> Message:
        rows, make = message.payload.rows, message.payload.make

        def altered():
            for index, piece in enumerate(make()):
                if index == 1:
                    piece = piece.clone()
                    piece[7] ^= 1
                yield piece

        return Message(message.kind, message.header, type(message.payload)(message.payload.nbytes, rows, altered))

    Tap(inner, flip)
    with pytest.raises(WireError, match="chunk 1 of message 0 .* failed authentication") as caught:
        exchange(frontend, backend, Message(Kind.UPLOAD, b"{}", torch.ones(2 * CHUNK, dtype=torch.uint8)))
    assert caught.value.reason == "failed authentication"


def test_a_changed_byte_of_a_header_is_refused(sealed) -> None:
    backend, frontend, inner = sealed
    Tap(inner, lambda m: Message(m.kind, m.header[:-1] + bytes([m.header[-1] ^ 1]), m.payload))
    with pytest.raises(WireError, match="message 0 \\(UPLOAD\\) failed authentication"):
        exchange(frontend, backend, Message(Kind.UPLOAD, b'{"accepted": true}'))


def test_a_changed_kind_is_refused(sealed) -> None:
    backend, frontend, inner = sealed
    Tap(inner, lambda m: Message(Kind.BYE, m.header, m.payload))
    with pytest.raises(WireError, match="message 0 \\(BYE\\) failed authentication"):
        exchange(frontend, backend, Message(Kind.DOWNLOAD, b"{}"))


def test_a_replayed_message_is_refused(sealed) -> None:
    backend, frontend, inner = sealed
    tap = Tap(inner)
    assert exchange(frontend, backend, Message(Kind.DOWNLOAD, b'{"version": 1}')).header == b'{"version": 1}'
    thread = threading.Thread(target=tap._send, args=(tap.sent[0], TIMEOUT), daemon=True)
    thread.start()
    with pytest.raises(WireError, match="message 0 came again \\(message 1 was due\\): a replay") as caught:
        backend.recv(LIMITS, TIMEOUT, TIMEOUT, zeros)
    thread.join(TIMEOUT.total_seconds())
    assert caught.value.reason == "replayed"


def test_a_message_out_of_order_is_refused(sealed) -> None:
    backend, frontend, _ = sealed
    frontend._seal(Message(Kind.DOWNLOAD, b"{}"))  # message 0 is sealed and lost
    with pytest.raises(WireError, match="message 1 came where message 0 was due"):
        exchange(frontend, backend, Message(Kind.DOWNLOAD, b"{}"))


def test_a_peer_with_another_key_is_refused(pipes) -> None:  # noqa: F811
    backend_keys, _ = key_pair()
    _, stranger_keys = key_pair()
    backend, frontend = SealedPipe(pipes[0], backend_keys), SealedPipe(pipes[1], stranger_keys)
    with pytest.raises(WireError, match="failed authentication: a changed byte, or a peer with another key"):
        exchange(frontend, backend, Message(Kind.DOWNLOAD, b"{}"))


def test_a_frontend_that_requires_a_protected_wire_refuses_a_backend_on_loopback_that_offers_a_plain_one() -> None:
    import openfl_api as ofl
    from test_transport import free_port

    init_method = f"tcp://127.0.0.1:{free_port()}"
    backend = ofl.API(frontend=False, token="t", connect_timeout=timedelta(seconds=10))
    backend.build_connection(address=ofl.Address(init_method=init_method, world_size=2, rank=0))
    try:
        assert backend._server.addresses.lobbies[next(iter(backend._server.addresses.lobbies))].wire == "plain"
        frontend = ofl.API(frontend=True, token="t", protect_wire=True, connect_timeout=timedelta(seconds=10))
        with pytest.raises(ofl.AdmissionError, match="offers a plain wire, but this frontend requires a protected one"):
            frontend.build_connection(address=ofl.Address(init_method=init_method, world_size=2, rank=1))
    finally:
        backend.stop("test over")
        backend.finish()
