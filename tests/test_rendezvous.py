"""Tests of openfl_api.transport.rendezvous over memory:// addresses: admission, refusals, pipes.

Everything runs in this process: the Lobby's threads play the backend, the test thread (or a thread
of its own) the frontend. Every wait is bounded by TIMEOUT.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
import torch

from openfl_api.address import Address
from openfl_api.errors import AdmissionError, TransportError
from openfl_api.logger import bind
from openfl_api.transport import rendezvous
from openfl_api.transport.base import REPLIES, REQUESTS, Kind, Limits, Message, Pipe
from openfl_api.transport.rendezvous import Lobby, Peer, join, token_from
from openfl_api.transport.store import open_store

TIMEOUT = timedelta(seconds=5)
WAIT = TIMEOUT.total_seconds()
TOKEN = b"shared-secret"
GROUP = "site"


def alloc(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8)


class Backend:
    """A Lobby on a fresh memory:// address that queues what it admits and refuses."""

    def __init__(self, name: str, world_size: int = 3, token: bytes = TOKEN) -> None:
        self.address = Address(init_method=f"memory://{name}", world_size=world_size, rank=0, group_name=GROUP)
        self.admitted: "queue.Queue[Tuple[Pipe, Peer]]" = queue.Queue()
        self.refused: "queue.Queue[Tuple[Optional[int], str]]" = queue.Queue()
        self.lobby = Lobby(
            self.address,
            open_store(self.address, backend=True, timeout=TIMEOUT),
            token,
            TIMEOUT,
            on_admit=lambda pipe, peer: self.admitted.put((pipe, peer)),
            on_refuse=lambda rank, reason: self.refused.put((rank, reason)),
            nick_name="the-backend",
        )

    def next_admitted(self) -> Tuple[Pipe, Peer]:
        try:
            return self.admitted.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"the backend admitted nobody within {WAIT} s")

    def next_refused(self) -> Tuple[Optional[int], str]:
        try:
            return self.refused.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"the backend refused nobody within {WAIT} s")


class Harness:
    """A unique memory:// name per test, and the lobbies and pipes to close after it."""

    def __init__(self) -> None:
        self.name = f"rdv-{uuid.uuid4().hex[:12]}"
        self.backends: List[Backend] = []
        self.pipes: List[Pipe] = []

    def backend(self, **kwargs: Any) -> Backend:
        backend = Backend(self.name, **kwargs)
        self.backends.append(backend)
        return backend

    def frontend_address(self, rank: int, world_size: int = 3) -> Address:
        return Address(init_method=f"memory://{self.name}", world_size=world_size, rank=rank, group_name=GROUP)

    def join(self, rank: int, token: bytes = TOKEN, world_size: int = 3, store: Any = None) -> Tuple[Pipe, str, Callable[[], bool]]:
        address = self.frontend_address(rank, world_size)
        store = store if store is not None else open_store(address, backend=False, timeout=TIMEOUT)
        pipe, backend_name, ended = join(address, store, token, f"client-{rank}", TIMEOUT)
        self.pipes.append(pipe)
        return pipe, backend_name, ended

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.close()
        for backend in self.backends:
            backend.lobby.close()
            while not backend.admitted.empty():
                backend.admitted.get_nowait()[0].close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


# --- admission ---------------------------------------------------------------------------------


def test_a_frontend_with_the_right_token_is_admitted(harness: Harness) -> None:
    backend = harness.backend()
    harness.join(rank=2)
    _, peer = backend.next_admitted()
    assert (peer.rank, peer.nick_name, peer.address, peer.join) == (2, "client-2", backend.address, 1)


def test_the_frontend_learns_the_backend_nick_name(harness: Harness) -> None:
    harness.backend()
    _, backend_name, _ = harness.join(rank=1)
    assert backend_name == "the-backend"


def test_ended_tells_when_the_backend_recorded_the_end(harness: Harness) -> None:
    backend = harness.backend()
    _, _, ended = harness.join(rank=1)
    before = ended()
    backend.lobby.end("all versions done")
    assert (before, ended()) == (False, True)


def test_a_request_travels_from_frontend_to_backend(harness: Harness) -> None:
    backend = harness.backend()
    frontend_pipe, _, _ = harness.join(rank=1)
    backend_pipe, _ = backend.next_admitted()
    payload = torch.arange(100, dtype=torch.uint8)
    frontend_pipe.send(Message(Kind.UPLOAD, b'{"version": 0}', payload), TIMEOUT)
    received = backend_pipe.recv(Limits(REQUESTS, max_header=64, max_payload=100), TIMEOUT, TIMEOUT, alloc)
    assert (received.kind, received.header, received.payload.tolist()) == (Kind.UPLOAD, b'{"version": 0}', payload.tolist())


def test_a_reply_travels_from_backend_to_frontend(harness: Harness) -> None:
    backend = harness.backend()
    frontend_pipe, _, _ = harness.join(rank=1)
    backend_pipe, _ = backend.next_admitted()
    frontend_pipe.send(Message(Kind.DOWNLOAD, b'{"version": 1}'), TIMEOUT)
    backend_pipe.recv(Limits(REQUESTS, 64, 0), TIMEOUT, TIMEOUT, alloc)
    backend_pipe.send(Message(Kind.MODEL, b'{"version": 1}', torch.full((64,), 7, dtype=torch.uint8)), TIMEOUT)
    reply = frontend_pipe.recv(Limits(REPLIES, 64, 64), TIMEOUT, TIMEOUT, alloc)
    assert (reply.kind, reply.header, reply.payload.tolist()) == (Kind.MODEL, b'{"version": 1}', [7] * 64)


def test_the_pipe_works_when_the_frontend_opens_its_side_first(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # The backend writes the verdict before it opens its side of the pipe, so a quick frontend may
    # open first; the two sides must still be connected.
    real_open_pipe = rendezvous._open_pipe
    frontend_opened = threading.Event()

    def frontend_first(address: Address, store: Any, prefix: str, rank: int, timeout: timedelta, keys=None) -> Pipe:
        if rank == 0:
            frontend_opened.wait(WAIT)
            return real_open_pipe(address, store, prefix, rank, timeout, keys)
        pipe = real_open_pipe(address, store, prefix, rank, timeout, keys)
        frontend_opened.set()
        return pipe

    monkeypatch.setattr(rendezvous, "_open_pipe", frontend_first)
    backend = harness.backend()
    frontend_pipe, _, _ = harness.join(rank=1)
    backend_pipe, _ = backend.next_admitted()
    frontend_pipe.send(Message(Kind.BYE), TIMEOUT)
    received = backend_pipe.recv(Limits(REQUESTS, 0, 0), timedelta(seconds=1), timedelta(seconds=1), alloc)
    assert received.kind == Kind.BYE


def test_two_frontends_are_admitted_with_their_own_pipes(harness: Harness) -> None:
    backend = harness.backend()
    pipes = {rank: harness.join(rank=rank)[0] for rank in (1, 2)}
    backend_pipes = dict((peer.rank, pipe) for pipe, peer in (backend.next_admitted(), backend.next_admitted()))
    for rank in (1, 2):
        pipes[rank].send(Message(Kind.UPLOAD, f'"from {rank}"'.encode()), TIMEOUT)
    headers = {rank: backend_pipes[rank].recv(Limits(REQUESTS, 64, 0), TIMEOUT, TIMEOUT, alloc).header for rank in (1, 2)}
    assert headers == {1: b'"from 1"', 2: b'"from 2"'}


def test_a_frontend_waiting_before_the_backend_serves_finds_its_lobby_registered(harness: Harness,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The backend serves an address while a frontend already waits for it: the frontend is admitted
    # at once, and on_admit must find the lobby in the backend's registry (a missing one closes the
    # pipe and keeps the rank taken: the frontend's every join again is refused as a duplicate).
    from openfl_api.backend.addresses import Addresses

    class SlowSet(set):
        def add(self, item: Any) -> None:  # a moment on the serving thread after the lobby exists
            super().add(item)
            threading.Event().wait(1.0)

    monkeypatch.setattr(rendezvous, "_live_lobbies", SlowSet())
    found: "queue.Queue[bool]" = queue.Queue()
    addresses: List[Addresses] = []
    address = Address(init_method=f"memory://{harness.name}", world_size=2, rank=0, group_name=GROUP)

    def on_admit(pipe: Pipe, peer: Peer) -> None:
        found.put(addresses[0].lobby(peer.address) is not None)
        harness.pipes.append(pipe)

    addresses.append(Addresses(TOKEN, TIMEOUT, "the-backend", bind("backend", 0), on_admit=on_admit,
                               on_refuse=lambda rank, reason: None))
    joined: "queue.Queue[Any]" = queue.Queue()
    threading.Thread(target=lambda: joined.put(harness.join(rank=1, world_size=2)), daemon=True).start()
    try:
        addresses[0].serve(address)
        assert found.get(timeout=WAIT) is True
        assert joined.get(timeout=WAIT)
    finally:
        addresses[0].close()


# --- refusals ----------------------------------------------------------------------------------


def test_a_wrong_token_is_refused_at_the_frontend(harness: Harness) -> None:
    harness.backend()
    with pytest.raises(AdmissionError, match="wrong token"):
        harness.join(rank=1, token=b"not-the-secret")


def test_a_wrong_token_is_reported_to_on_refuse(harness: Harness) -> None:
    backend = harness.backend()
    with pytest.raises(AdmissionError):
        harness.join(rank=1, token=b"not-the-secret")
    rank, reason = backend.next_refused()
    assert rank == 1 and "wrong token" in reason


def test_a_wrong_token_is_not_admitted(harness: Harness) -> None:
    backend = harness.backend()
    with pytest.raises(AdmissionError):
        harness.join(rank=1, token=b"not-the-secret")
    backend.next_refused()  # the handshake is over: it refused, so it must not also admit
    assert backend.admitted.empty()


def test_a_second_frontend_on_a_connected_rank_is_refused(harness: Harness) -> None:
    backend = harness.backend()
    harness.join(rank=1)
    backend.next_admitted()
    with pytest.raises(AdmissionError, match="rank 1 is already connected"):
        harness.join(rank=1)


def test_a_duplicate_rank_is_reported_to_on_refuse(harness: Harness) -> None:
    backend = harness.backend()
    harness.join(rank=1)
    with pytest.raises(AdmissionError):
        harness.join(rank=1)
    rank, reason = backend.next_refused()
    assert rank == 1 and "already connected" in reason


def test_a_rank_beyond_the_backend_world_size_is_refused(harness: Harness) -> None:
    harness.backend(world_size=3)
    with pytest.raises(AdmissionError, match=r"frontend rank must be in \[1, 3\)"):
        harness.join(rank=3, world_size=4)  # the frontend believes in a larger federation


def test_a_rank_beyond_the_world_size_is_reported_without_a_rank(harness: Harness) -> None:
    backend = harness.backend(world_size=3)
    with pytest.raises(AdmissionError):
        harness.join(rank=5, world_size=8)
    rank, reason = backend.next_refused()
    assert rank is None and "frontend rank must be in [1, 3)" in reason


def test_rank_zero_cannot_join_as_a_frontend(harness: Harness) -> None:
    harness.backend()
    with pytest.raises(AdmissionError, match=r"frontend rank must be in \[1, 3\) on memory://\S+, got 0"):
        harness.join(rank=0)


def test_after_release_the_rank_can_join_again(harness: Harness) -> None:
    backend = harness.backend()
    harness.join(rank=1)
    backend.next_admitted()
    backend.lobby.release(1)
    harness.join(rank=1)
    _, peer = backend.next_admitted()
    assert (peer.rank, peer.join) == (1, 2)


def test_a_refused_rank_stays_free(harness: Harness) -> None:
    backend = harness.backend()
    with pytest.raises(AdmissionError):
        harness.join(rank=1, token=b"not-the-secret")
    harness.join(rank=1)
    _, peer = backend.next_admitted()
    assert peer.rank == 1


# --- file descriptors and pipes that fail to build --------------------------------------------


@pytest.fixture
def short_of_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipes on memory:// addresses cost 6 descriptors, and 1000 of 1024 are open."""
    monkeypatch.setitem(rendezvous._PIPE_DESCRIPTORS, "memory", 6)
    monkeypatch.setattr(rendezvous, "_descriptors", lambda: (1000, 1024))


def test_a_frontend_is_refused_with_the_reason_when_the_backend_is_short_of_descriptors(
    harness: Harness, short_of_descriptors: None
) -> None:
    harness.backend()
    with pytest.raises(AdmissionError, match=r"1000 of its 1024 file descriptors \(ulimit -n\) are open"):
        harness.join(rank=1)


def test_a_refusal_for_descriptors_is_reported_to_on_refuse(harness: Harness, short_of_descriptors: None) -> None:
    backend = harness.backend()
    with pytest.raises(AdmissionError):
        harness.join(rank=1)
    rank, reason = backend.next_refused()
    assert (rank, reason.startswith("the backend cannot take rank 1: 1000 of its 1024 file descriptors")) == (1, True)


def test_the_descriptors_of_pipes_being_built_count(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # 990 open + 6 per pipe + 32 spare: one pipe fits under 1030, a second one being built does not.
    monkeypatch.setitem(rendezvous._PIPE_DESCRIPTORS, "memory", 6)
    monkeypatch.setattr(rendezvous, "_descriptors", lambda: (990, 1030))
    backend = harness.backend()
    backend.lobby._building = 1
    with pytest.raises(AdmissionError, match="the backend cannot take rank 1"):
        harness.join(rank=1)


def test_a_lobby_warns_at_start_when_the_limit_cannot_hold_every_frontend(
    harness: Harness, short_of_descriptors: None
) -> None:
    warnings: List[str] = []

    class Log:
        def warning(self, message: str) -> None:
            warnings.append(message)

        def debug(self, message: str) -> None:
            pass

    address = Address(init_method=f"memory://{harness.name}", world_size=4, rank=0, group_name=GROUP)
    lobby = Lobby(address, open_store(address, backend=True, timeout=TIMEOUT), TOKEN, TIMEOUT,
                  on_admit=lambda pipe, peer: None, on_refuse=lambda rank, reason: None, nick_name="b", log=Log())
    lobby.close()
    assert warnings == [
        f"the file descriptor limit (ulimit -n) is 1024 and 1000 are open: this backend can hold at most about 0 frontends "
        f"on memory://{harness.name}, not the 3 world_size 4 allows; each needs 6. Others will be refused: raise "
        "the limit, e.g. ulimit -n 65536, before starting the backend"
    ]


def _failing_backend_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's first pipe fails as torch fails a gloo device out of descriptors."""
    real_open_pipe = rendezvous._open_pipe
    failures = [RuntimeError("[enforce fail at device.cc:186] rv != -1. Too many open files")]

    def open_pipe(address: Address, store: Any, prefix: str, rank: int, timeout: timedelta, keys=None) -> Pipe:
        if rank == 0 and failures:
            raise failures.pop()
        return real_open_pipe(address, store, prefix, rank, timeout, keys)

    monkeypatch.setattr(rendezvous, "_open_pipe", open_pipe)


def test_a_pipe_the_backend_cannot_build_is_reported_to_on_refuse(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_backend_side(monkeypatch)
    backend = harness.backend()
    harness.join(rank=1)  # the frontend's side of a memory pipe needs no partner to open
    assert backend.next_refused() == (
        1, "rank 1 was admitted but its pipe failed: [enforce fail at device.cc:186] rv != -1. Too many open files"
    )


def test_after_its_pipe_failed_the_rank_can_join_again(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_backend_side(monkeypatch)
    backend = harness.backend()
    harness.join(rank=1)
    backend.next_refused()
    harness.join(rank=1)
    _, peer = backend.next_admitted()
    assert (peer.rank, peer.join) == (1, 2)


# --- timing ------------------------------------------------------------------------------------


class WatchedStore:
    """Passes every call to a store; sets ``looked_for_session`` when ``session`` was checked and absent."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.looked_for_session = threading.Event()

    def check(self, keys: List[str]) -> bool:
        found = self._store.check(keys)
        if keys == ["session"] and not found:
            self.looked_for_session.set()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_frontend_that_joins_before_the_backend_waits_and_is_admitted(harness: Harness) -> None:
    store = WatchedStore(open_store(harness.frontend_address(1), backend=False, timeout=TIMEOUT))
    outcome: "queue.Queue[object]" = queue.Queue()

    def frontend() -> None:
        try:
            outcome.put(harness.join(rank=1, store=store))
        except BaseException as exc:  # handed to the test thread
            outcome.put(exc)

    thread = threading.Thread(target=frontend, name="early-frontend", daemon=True)
    thread.start()
    assert store.looked_for_session.wait(WAIT), "the frontend never looked for a backend"
    backend = harness.backend()
    result = outcome.get(timeout=WAIT)
    thread.join(WAIT)
    assert not isinstance(result, BaseException), result
    assert backend.next_admitted()[1].rank == 1


def test_no_backend_is_a_transport_error(harness: Harness) -> None:
    address = harness.frontend_address(1)
    store = open_store(address, backend=False, timeout=TIMEOUT)
    with pytest.raises(TransportError, match="no backend at memory://rdv-"):
        join(address, store, TOKEN, "client-1", timedelta(milliseconds=100))


# --- token_from --------------------------------------------------------------------------------


def test_token_from_prefers_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENFL_API_TOKEN", "from-env")
    assert token_from("given") == b"given"


def test_token_from_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENFL_API_TOKEN", "from-env")
    assert token_from(None) == b"from-env"


def test_token_from_defaults_to_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENFL_API_TOKEN", raising=False)
    assert token_from(None) == b""


def test_closing_the_lobby_ends_a_handshake_that_waits_for_the_frontends_answer(harness: Harness) -> None:
    # A frontend said hello and went silent: its handshake polls the store for the answer. A
    # thread left polling when the interpreter exits aborts the process, so close() ends it.
    backend = harness.backend()
    lobby, store = backend.lobby, backend.lobby.store
    index = store.add(f"{lobby.session}/joins", 1)
    base = f"{lobby.session}/join/{index}"
    store.set(f"{base}/hello", json.dumps({"protocol": rendezvous.PROTOCOL, "rank": 1, "nick_name": "silent",
                                           "nonce": "0" * 32, "key": "ab" * 32}))
    deadline = time.monotonic() + WAIT
    while not store.check([f"{base}/challenge"]):  # the handshake now waits for the answer
        assert time.monotonic() < deadline, "the lobby never challenged the frontend"
        time.sleep(0.01)
    handshake = next(t for t in threading.enumerate() if t.name == f"openfl-join-{index}")
    started = time.monotonic()
    lobby.close()
    assert not handshake.is_alive()
    assert time.monotonic() - started < 1.0
    assert backend.refused.empty()  # abandoned, not refused: the backend is closing
