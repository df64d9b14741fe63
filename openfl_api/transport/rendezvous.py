"""Rendezvous and admission over an address's store, then one pipe per admitted frontend.

The store is the control plane only (keys under ``openfl_api/<group_name>/``):

1. The backend writes a fresh ``session`` id. A frontend reads it, takes a join number ``n`` with
   ``add(<session>/joins, 1)`` and writes ``<session>/join/<n>/hello`` (rank, nick name, nonce, the
   public half of a fresh X25519 key).
2. The backend answers ``.../challenge`` with a random challenge, the wire's mode (protected or
   plain, :mod:`openfl_api.transport.wire`), its own public key and its proof of the token (an HMAC
   of the frontend's nonce, the mode and both keys). The frontend answers ``.../response`` with an
   HMAC of the challenge, its rank, its nonce, the mode and both keys, keyed by the shared token.
3. The backend checks the HMAC, the rank range, that the rank is not already connected and that
   it has the file descriptors a pipe needs, and writes ``.../verdict``. If admitted, both sides
   build the pipe under ``<session>/pipe/<n>``; on a protected wire each side derives the pipe's
   keys from the two key halves and the token.

A session id per backend start means a stale file store from an earlier run is never mistaken for
the live one: a frontend that joined a dead session re-reads ``session`` and joins again.
Nothing read from the store is unpickled; every value is size-limited JSON.

File descriptors: on the backend each gloo pipe keeps one, its pair's socket, besides the
frontend's store connection (gloo's listener, its event loop's epoll and wake-up pipe belong to
the process's one gloo device: :mod:`openfl_api.transport.gloo`). Gloo
aborts the whole process when an ``accept`` hits the descriptor limit, so a lobby refuses a
frontend, with the reason, while fewer than ``_PIPE_DESCRIPTORS + _SPARE_DESCRIPTORS`` are left
below the soft ``RLIMIT_NOFILE`` (``ulimit -n``), and warns at start when the limit cannot hold
``world_size - 1`` frontends.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import weakref
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch.distributed import Store

from openfl_api.address import Address
from openfl_api.errors import AdmissionError, TransportError
from openfl_api.logger import bind
from openfl_api.transport.base import Pipe
from openfl_api.transport.gloo import open_gloo_pipe
from openfl_api.transport.memory import open_memory_pipe
from openfl_api.transport.store import fresh_client, wait_for_key
from openfl_api.transport.wire import PLAIN, PROTECTED, KeyExchange, SealedPipe, WireKeys, is_public_key, \
    protected_by_default
from openfl_api.waiting import interruptible, logged

__all__ = ["Peer", "Lobby", "join", "token_from", "PROTOCOL"]

PROTOCOL = 2
MAX_VALUE = 4096
_POLL = timedelta(seconds=0.1)
_RETRY = timedelta(seconds=3)
DUPLICATE_GRACE = timedelta(seconds=5)
# Descriptors a backend needs per pipe, by scheme: the five a gloo pipe keeps and one more while
# it connects (the frontend's store connection is open already when the lobby checks).
_PIPE_DESCRIPTORS = {"tcp": 2, "file": 2}
_SPARE_DESCRIPTORS = 32  # for logs, checkpoints, the address file and frontends connecting to the store
_live_lobbies: "weakref.WeakSet[Lobby]" = weakref.WeakSet()


@atexit.register
def _close_lobbies() -> None:
    # A lobby thread still polling its store while the interpreter tears torch down can abort the
    # process; an API that was never finished must not make the program's exit fail.
    for lobby in list(_live_lobbies):
        lobby.close()


@dataclass(frozen=True)
class Peer:
    """An admitted frontend as the backend knows it."""

    rank: int
    nick_name: str
    address: Address
    join: int


def token_from(token: Optional[str]) -> bytes:
    """Return the admission token: the argument, else ``OPENFL_API_TOKEN``, else empty."""
    value = token if token is not None else os.environ.get("OPENFL_API_TOKEN", "")
    return value.encode("utf-8")


def _mac(token: bytes, *parts: Any) -> str:
    return hmac.new(token, "|".join(str(p) for p in parts).encode("utf-8"), hashlib.sha256).hexdigest()


def _descriptors() -> Optional[Tuple[int, int]]:
    """Return ``(open, soft limit)`` of this process's file descriptors, or None where unknown."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    folder = "/proc/self/fd" if sys.platform.startswith("linux") else "/dev/fd"
    try:
        return len(os.listdir(folder)), soft
    except OSError:
        return None


def _open_pipe(address: Address, store: Store, prefix: str, rank: int, timeout: timedelta,
               keys: Optional[WireKeys] = None) -> Pipe:
    if address.scheme == "memory":
        return open_memory_pipe(f"{address.init_method}/{address.group_name}/{prefix}", rank)
    pipe = open_gloo_pipe(store, prefix, rank, timeout, address.host)
    return SealedPipe(pipe, keys) if keys is not None else pipe


def _read_json(store: Store, key: str) -> Dict[str, Any]:
    raw = store.get(key)
    if len(raw) > MAX_VALUE:
        raise AdmissionError(f"store value {key!r} is {len(raw)} bytes; at most {MAX_VALUE} are allowed")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdmissionError(f"store value {key!r} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise AdmissionError(f"store value {key!r} must be a JSON object")
    return value


class Lobby:
    """The backend's side of one address: hands out a session, admits frontends, builds pipes.

    Args:
        address: the address to serve.
        store: its store, from :func:`open_store`.
        token: the shared admission token.
        timeout: how long a joining frontend may take to answer and to build its pipe half.
        on_admit: ``on_admit(pipe, peer)``, called from a handshake thread.
        on_refuse: ``on_refuse(rank_or_None, reason)``, called from a handshake thread.
        nick_name: the backend's name, told to frontends.
        protect_wire: whether the pipes' messages are sealed (:mod:`openfl_api.transport.wire`);
            None: unless the address stays on this machine.
        start: open the lobby at once; False: once :meth:`start` is called (a caller that must
            find the lobby registered in ``on_admit`` registers it first).
    """

    def __init__(
        self,
        address: Address,
        store: Store,
        token: bytes,
        timeout: timedelta,
        on_admit: Callable[[Pipe, Peer], None],
        on_refuse: Callable[[Optional[int], str], None],
        nick_name: str,
        log: Any = None,
        protect_wire: Optional[bool] = None,
        start: bool = True,
    ) -> None:
        self.address = address
        protected = protected_by_default(address) if protect_wire is None else protect_wire
        self.wire = PROTECTED if protected and address.scheme != "memory" else PLAIN
        self.store = store
        self._token = token
        self._timeout = timeout
        self._on_admit = on_admit
        self._on_refuse = on_refuse
        self._nick_name = nick_name
        self._log = log or bind("backend", 0)
        self._ranks: set = set()
        self._ranks_lock = threading.Lock()
        self._building = 0  # pipes being built now, each about to take _PIPE_DESCRIPTORS
        self._stop = threading.Event()
        self._handshakes: List[threading.Thread] = []  # the handshake threads started, joined by close()
        self._warn_if_short_of_descriptors()
        self.session = secrets.token_hex(8)
        self._thread = threading.Thread(target=self._run, name=f"openfl-lobby-{address.group_name}", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Open the lobby: publish the session that frontends wait for and start admitting."""
        _live_lobbies.add(self)
        self.store.set("session", self.session)
        self._thread.start()

    def _warn_if_short_of_descriptors(self) -> None:
        per_pipe = _PIPE_DESCRIPTORS.get(self.address.scheme, 0)
        counted = _descriptors() if per_pipe else None
        if counted is None:
            return
        used, limit = counted
        room = max(0, (limit - used - _SPARE_DESCRIPTORS) // per_pipe)
        if room < self.address.world_size - 1:
            self._log.warning(
                f"the file descriptor limit (ulimit -n) is {limit} and {used} are open: this backend can hold "
                f"at most about {room} frontends on {self.address.init_method}, not the {self.address.world_size - 1} "
                f"world_size {self.address.world_size} allows; each needs {per_pipe}. Others will be refused: "
                "raise the limit, e.g. ulimit -n 65536, before starting the backend"
            )

    def _check_descriptors(self, rank: int) -> None:
        """Raise AdmissionError unless a pipe more fits below the descriptor limit; call under _ranks_lock."""
        per_pipe = _PIPE_DESCRIPTORS.get(self.address.scheme, 0)
        counted = _descriptors() if per_pipe else None
        if counted is None:
            return
        used, limit = counted
        if used + (self._building + 1) * per_pipe + _SPARE_DESCRIPTORS > limit:
            raise AdmissionError(
                f"the backend cannot take rank {rank}: {used} of its {limit} file descriptors (ulimit -n) are "
                f"open and a pipe needs {per_pipe}, with {_SPARE_DESCRIPTORS} kept spare; raise the backend's "
                "limit, e.g. ulimit -n 65536, or spread the frontends over more backends"
            )

    def release(self, rank: int) -> None:
        """Free ``rank`` so a restarted frontend can join with it."""
        with self._ranks_lock:
            self._ranks.discard(rank)

    def end(self, reason: str) -> None:
        """Record in the store that the federation ended, for frontends whose pipe broke."""
        try:
            self.store.set(f"{self.session}/ended", reason)
        except RuntimeError:
            pass

    def close(self) -> None:
        """Stop admitting frontends: the lobby's thread and every handshake still waiting for a
        frontend end (a thread left polling the store when the interpreter exits aborts it)."""
        self._stop.set()
        deadline = time.monotonic() + 2 * _POLL.total_seconds() + 1
        if self._thread.ident is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for thread in list(self._handshakes):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        index = 1
        missing_since: Optional[float] = None
        idle = False
        while not self._stop.is_set():
            key = f"{self.session}/join/{index}/hello"
            # Once nobody has come for a whole poll, look every 50 ms only: an idle lobby should
            # not keep taking the interpreter from the threads that train and aggregate.
            idle = not wait_for_key(self.store, key, _POLL, delay=0.05 if idle else 0.002, stop=self._stop)
            if idle:
                # A frontend that died between taking a number and writing its hello must not
                # block those after it: skip its number once later ones exist and it is overdue.
                try:
                    taken = self.store.add(f"{self.session}/joins", 0)
                except RuntimeError:
                    continue
                if taken > index:
                    missing_since = missing_since or time.monotonic()
                    if time.monotonic() - missing_since > self._timeout.total_seconds():
                        self._log.warning(f"join {index} on {self.address.init_method} never said hello; skipped")
                        index, missing_since = index + 1, None
                continue
            missing_since = None
            handshake = threading.Thread(target=self._handshake, args=(index,), name=f"openfl-join-{index}", daemon=True)
            self._handshakes = [t for t in self._handshakes if t.is_alive()] + [handshake]
            handshake.start()
            index += 1

    def _handshake(self, index: int) -> None:
        base = f"{self.session}/join/{index}"
        rank: Optional[int] = None
        challenged = False
        code = "refused"
        try:
            hello = _read_json(self.store, f"{base}/hello")
            rank, nick_name, nonce, their_key = _check_hello(hello, self.address)
            challenge = secrets.token_hex(16)
            exchange = KeyExchange()
            proof = _mac(self._token, "backend", self.session, index, nonce, self.wire, exchange.public, their_key)
            self.store.set(f"{base}/challenge", json.dumps({"challenge": challenge, "proof": proof, "wire": self.wire,
                                                            "key": exchange.public}))
            challenged = True
            if not wait_for_key(self.store, f"{base}/response", self._timeout, stop=self._stop):
                if self._stop.is_set():
                    self._log.debug(f"join {index} abandoned: the lobby closed")
                    return
                raise AdmissionError(f"rank {rank} did not answer the challenge within {self._timeout}")
            answer = _read_json(self.store, f"{base}/response").get("mac")
            expected = _mac(self._token, "frontend", self.session, index, rank, nonce, challenge, self.wire,
                            exchange.public, their_key)
            if not isinstance(answer, str) or not hmac.compare_digest(answer, expected):
                raise AdmissionError(
                    f"rank {rank} ({nick_name}) answered with a wrong token; give every rank the same "
                    "token (API(token=...) or OPENFL_API_TOKEN)"
                )
            with self._ranks_lock:
                if rank in self._ranks:
                    code = "duplicate"
                    raise AdmissionError(
                        f"rank {rank} is already connected on {self.address.init_method}; a second frontend "
                        "cannot claim it: give each frontend its own rank"
                    )
                self._check_descriptors(rank)
                self._ranks.add(rank)
                self._building += 1
        except AdmissionError as exc:
            self._refuse(base, rank, str(exc), challenged, code)
            return
        except RuntimeError as exc:  # the store went away: the backend is closing
            self._log.debug(f"join {index} abandoned: {exc}")
            return
        prefix = f"{self.session}/pipe/{index}"
        try:
            self.store.set(f"{base}/verdict", json.dumps({"ok": True, "pipe": prefix, "backend": self._nick_name}))
            keys = (exchange.keys(their_key, self._token, f"{self.session}|{index}|{nonce}|{challenge}", frontend=False)
                    if self.wire == PROTECTED else None)
            pipe = _open_pipe(self.address, self.store, prefix, 0, self._timeout, keys)
        except (TransportError, RuntimeError) as exc:
            # RuntimeError: torch raises it for a gloo device it cannot create (out of descriptors).
            self.release(rank)
            self._on_refuse(rank, f"rank {rank} was admitted but its pipe failed: {str(exc).splitlines()[0][:300]}")
            return
        finally:
            with self._ranks_lock:
                self._building -= 1
        self._on_admit(pipe, Peer(rank=rank, nick_name=nick_name, address=self.address, join=index))

    def _refuse(self, base: str, rank: Optional[int], reason: str, challenged: bool, code: str = "refused") -> None:
        # Before the challenge the frontend waits on the challenge key, after it on the verdict.
        key = f"{base}/verdict" if challenged else f"{base}/challenge"
        value = {"ok": False, "reason": reason, "code": code} if challenged else {"refused": reason}
        try:
            self.store.set(key, json.dumps(value))
        except RuntimeError:
            pass
        self._on_refuse(rank, reason)


def _check_hello(hello: Dict[str, Any], address: Address) -> Tuple[int, str, str, str]:
    if hello.get("protocol") != PROTOCOL:
        raise AdmissionError(f"peer speaks protocol {hello.get('protocol')!r}; this backend speaks {PROTOCOL}")
    rank, nick_name, nonce = hello.get("rank"), hello.get("nick_name"), hello.get("nonce")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank < address.world_size:
        raise AdmissionError(
            f"frontend rank must be in [1, {address.world_size}) on {address.init_method}, got {rank!r}; "
            "raise world_size or fix the rank"
        )
    if not isinstance(nick_name, str) or not 0 < len(nick_name) <= 64 or not nick_name.isprintable():
        raise AdmissionError(f"nick name must be 1-64 printable characters, got {str(nick_name)[:70]!r}")
    if not isinstance(nonce, str) or len(nonce) != 32:
        raise AdmissionError("hello carries no valid nonce")
    key = hello.get("key")
    if not is_public_key(key):
        raise AdmissionError("hello carries no valid key (64 hex digits)")
    return rank, nick_name, nonce, key


def join(
    address: Address,
    store: Store,
    token: bytes,
    nick_name: str,
    timeout: timedelta,
    log: Any = None,
    status: timedelta = timedelta(seconds=10),
    protect_wire: Optional[bool] = None,
) -> Tuple[Pipe, str, Callable[[], Optional[bool]]]:
    """Join the backend at ``address`` as frontend ``address.rank``; blocks until admitted.

    The backend decides whether the wire is protected; with ``protect_wire=True`` a plain wire is
    refused (AdmissionError).

    Every wait logs what it waits for every ``status`` interval; building the pipe does not hold
    up Ctrl-C.

    A refusal because the rank is still connected is retried for up to ``DUPLICATE_GRACE``: a
    restarted frontend may join before the backend noticed that the previous process died.

    Returns:
        ``(pipe, backend_nick_name, ended)`` where ``ended()`` tells whether the backend has
        recorded the end of the federation (None when the store cannot be reached).

    Raises:
        AdmissionError: the backend refused this frontend; the message says why.
        TransportError: no backend answered within ``timeout``.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    duplicate_until = time.monotonic() + min(DUPLICATE_GRACE.total_seconds(), timeout.total_seconds() / 2)
    duplicate_delay = 0.25

    def remaining(cap: Optional[timedelta] = None) -> timedelta:
        left = timedelta(seconds=max(0.0, deadline - time.monotonic()))
        return min(left, cap) if cap is not None else left

    log = log or bind("frontend", address.rank)
    where = f"{address.init_method} (group {address.group_name!r})"
    refused: Optional[Dict[str, Any]] = None
    try:
        while True:
            with logged(log, status, f"a backend to open {where}"):
                found = wait_for_key(store, "session", remaining())
            if not found:
                raise TransportError(
                    f"no backend at {address.init_method} (group {address.group_name!r}) within {timeout}; "
                    "start rank 0 or check the address"
                )
            session = store.get("session").decode()
            index = store.add(f"{session}/joins", 1)
            base = f"{session}/join/{index}"
            nonce = secrets.token_hex(16)
            exchange = KeyExchange()
            hello = {"protocol": PROTOCOL, "rank": address.rank, "nick_name": nick_name, "nonce": nonce,
                     "key": exchange.public}
            store.set(f"{base}/hello", json.dumps(hello))
            answered = False
            with logged(log, status, f"the backend at {where} to answer join {index}"):
                while remaining() > timedelta(0):
                    if wait_for_key(store, f"{base}/challenge", remaining(_RETRY)):
                        answered = True
                        break
                    if store.get("session").decode() != session:
                        break  # the backend restarted: join its new session
            if not answered:
                if remaining() > timedelta(0):
                    continue
                raise TransportError(f"the backend at {address.init_method} did not answer within {timeout}")
            challenge = _read_json(store, f"{base}/challenge")
            if "refused" in challenge:
                _raise_refused({"reason": challenge["refused"]})
            wire, their_key = challenge.get("wire"), challenge.get("key")
            if wire not in (PROTECTED, PLAIN) or not is_public_key(their_key):
                raise AdmissionError(f"the backend answered with an unknown wire {str(wire)[:40]!r} or key; "
                                     "run the same openfl_api version on every rank")
            if wire == PLAIN and protect_wire and address.scheme != "memory":
                raise AdmissionError(
                    f"the backend at {address.init_method} offers a plain wire, but this frontend requires a "
                    "protected one (API(protect_wire=True)); give the backend protect_wire=True (or leave it "
                    "None on an address that is not loopback), or let this frontend take a plain wire")
            mac = _mac(token, "frontend", session, index, address.rank, nonce, challenge.get("challenge"), wire,
                       their_key, exchange.public)
            store.set(f"{base}/response", json.dumps({"mac": mac}))
            with logged(log, status, f"the backend at {where} to admit join {index}"):
                decided = wait_for_key(store, f"{base}/verdict", remaining())
            if not decided:
                raise TransportError(f"the backend at {address.init_method} gave no verdict within {timeout}")
            verdict = _read_json(store, f"{base}/verdict")
            if verdict.get("ok") is not True:
                if verdict.get("code") == "duplicate" and time.monotonic() < duplicate_until:
                    time.sleep(min(duplicate_delay, max(0.0, duplicate_until - time.monotonic())))
                    duplicate_delay *= 2
                    refused = verdict
                    continue
                _raise_refused(verdict)
            proof = challenge.get("proof")
            expected = _mac(token, "backend", session, index, nonce, wire, their_key, exchange.public)
            if not isinstance(proof, str) or not hmac.compare_digest(proof, expected):
                raise AdmissionError("the backend could not prove it holds the token; refusing to send it anything")
            prefix = verdict.get("pipe")
            if prefix != f"{session}/pipe/{index}":
                raise AdmissionError(f"the backend named an unexpected pipe {str(prefix)[:80]!r}")
            with logged(log, status, f"the pipe to the backend at {where} to be built"):
                keys = (exchange.keys(their_key, token, f"{session}|{index}|{nonce}|{challenge.get('challenge')}",
                                      frontend=True) if wire == PROTECTED else None)
                pipe = interruptible(lambda: _open_pipe(address, store, prefix, 1, remaining(), keys))

            def ended() -> Optional[bool]:
                try:
                    return fresh_client(address, store).check([f"{session}/ended"])
                except (RuntimeError, OSError):
                    return None  # the store is gone with the backend

            return pipe, str(verdict.get("backend", "backend"))[:64], ended
    except RuntimeError as exc:  # the store went away under us: the backend is gone
        if refused is not None:
            _raise_refused(refused)
        raise TransportError(
            f"lost the store of {address.init_method} while joining: {str(exc).splitlines()[0]}"
        ) from exc


def _raise_refused(verdict: Dict[str, Any]) -> None:
    reason = str(verdict.get("reason", "no reason given"))[:500]
    error = AdmissionError(f"the backend refused this frontend: {reason}")
    error.code = verdict.get("code")  # "duplicate": the rank is still connected
    raise error
