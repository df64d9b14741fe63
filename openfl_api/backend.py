"""The backend's serve loop: one event loop that owns the model, the version, the steps and the
aggregator, fed by one I/O thread per pipe.

Pipe threads only move bytes: a thread receives a request, posts it to the loop, waits for the
loop's reply and sends it; while an upload's pieces arrive it also sums the ones that have landed
(a read-only finite check the loop then trusts). The loop validates payloads, applies the version
rules, fires the steps and aggregates, so nothing a step touches is shared between threads. After
it has answered an accepted upload, the loop hands the accumulation into the aggregator to one
accumulation thread and may serve download requests meanwhile; it waits for that accumulation
before any other event and before anything that reads the aggregator (aggregation, ``expect``,
checkpoints, the end). Downloads are served from an encoding of the global model cached per
version.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from openfl_api.address import Address, AddressFileWatcher
from openfl_api.aggregate.functional import mix
from openfl_api.asynchronous import Asynchronous
from openfl_api.errors import ConfigurationError, PayloadError, ProtocolError, TransportError
from openfl_api.payload import (
    MAX_HEADER_BYTES, FiniteScan, decode, encode, encode_header, insert_field, parse_header, split, validate_meta,
)
from openfl_api.report import Ledger
from openfl_api.state import SharedState
from openfl_api.step import Event, Transfer
from openfl_api.transport.base import REQUESTS, Kind, Limits, Message, Pieces, Pipe, check_frame, frame_of
from openfl_api.transport.rendezvous import Lobby, Peer, open_store

__all__ = ["Server", "Timeouts", "client_order", "newest_checkpoint"]

MAX_CLIENTS = 100_000
CHECKPOINT_FORMAT = 2


def client_order(client: str) -> Tuple[int, int, str]:
    """Natural order of client ids: numbers by value (``"2"`` before ``"10"``), then names."""
    return (0, int(client), "") if client.isascii() and client.isdigit() else (1, 0, client)


@dataclass(frozen=True)
class Timeouts:
    """Every wait of an API, as ``datetime.timedelta``.

    Attributes:
        idle: how long a pipe waits for the peer's next message (a frontend training, a backend
            holding a download for the next version) before the pipe is dropped.
        transfer: how long one message may take once it started.
        connect: how long a frontend waits to be admitted; how long a join may take.
        drain: how long ``finish()`` on the backend waits for frontends to say goodbye.
        tick: how often the idle serve loop wakes up to fire ``at_loop``.
        heartbeat: how often a pipe whose download is held pings its frontend, so a frontend that
            died while waiting is noticed (and its rank freed for a restart) within this time.
    """

    idle: timedelta = timedelta(minutes=30)
    transfer: timedelta = timedelta(minutes=5)
    connect: timedelta = timedelta(minutes=5)
    drain: timedelta = timedelta(seconds=10)
    tick: timedelta = timedelta(milliseconds=100)
    heartbeat: timedelta = timedelta(seconds=1)

    def __post_init__(self) -> None:
        for name in ("idle", "transfer", "connect", "drain", "tick", "heartbeat"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigurationError(
                    f"timeout {name!r} must be a positive datetime.timedelta, got {value!r}; "
                    f"write {name}=timedelta(seconds=...)"
                )


@dataclass
class _Joined:
    worker: "_Worker"


@dataclass
class _Request:
    worker: "_Worker"
    message: Message


@dataclass
class _Left:
    worker: "_Worker"
    reason: str


@dataclass
class _AddressChange:
    added: List[Address]
    removed: List[Address]


_PING = Message(Kind.PING)

#: Uploads of at least this many bytes are accumulated on the accumulation thread while the loop
#: goes on; smaller ones are added on the loop, where the hand-off would cost more than the addition.
OVERLAP_BYTES = 4 * 1024 * 1024


def _end_message(reason: str) -> Message:
    return Message(Kind.END, encode_header({"reason": reason}))


class _Worker:
    """The I/O thread of one pipe: request in, to the loop, reply out.

    An in-process pipe (:meth:`Pipe.deliver_to`) needs no thread of its own past the start: each
    request comes on the frontend's thread, which handles it at once (:meth:`Server.handle_now`).
    """

    def __init__(self, server: "Server", pipe: Pipe, peer: Peer, lobby: Lobby) -> None:
        self.server = server
        self.pipe = pipe
        self.peer = peer
        self.lobby = lobby
        self.label = f"{peer.address.group_name}/rank{peer.rank}"
        self.clients: Optional[Tuple[str, ...]] = None  # registered with the first request
        self.hosts_many = False  # True when the frontend named its clients (virtual clients)
        self.closing = False
        self._replies: "queue.SimpleQueue[Message]" = queue.SimpleQueue()
        self._buffer = torch.empty(0, dtype=torch.uint8)
        # Set while the loop holds no upload in the receive buffer (it accumulates after its ACK).
        self.free = threading.Event()
        self.free.set()
        # Set once the answer to the request at hand is sent (or the pipe is gone): an accumulation
        # starts only then, so it does not hold up the worker's thread, which needs the interpreter
        # lock to send the answer.
        self.replied = threading.Event()
        self.replied.set()
        self.scan: Optional[FiniteScan] = None  # the finite check of the upload being received
        self.joined = threading.Event()  # set once the loop has handled this worker's _Joined
        self._gone_lock = threading.Lock()
        self._is_gone = False
        self._thread = threading.Thread(target=self._run, name=f"openfl-pipe-{self.label}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reply(self, message: Message) -> None:
        """Called by the loop: the answer to the request this worker is waiting on.

        A pipe that only queues what it sends (in-process) gets the reply from the loop itself;
        other pipes get it from this worker's thread, so a slow peer never blocks the loop.
        """
        if not self.pipe.queues_sends:
            self._replies.put(message)
            return
        try:
            self.pipe.send(message, self.server.timeouts.transfer)
        except TransportError:
            pass  # closed on this side: the worker's thread ends at its next receive
        finally:
            self.replied.set()

    def _alloc(self, size: int) -> torch.Tensor:
        # The loop may still accumulate the previous upload after its ACK: wait until it is done.
        while not self.free.wait(self.server.timeouts.tick.total_seconds()):
            if self.server.ended:
                break
        if self._buffer.numel() < size:
            self._buffer = torch.zeros(size, dtype=torch.uint8)  # zero padding keeps the finite check on its fast path
        buffer = self._buffer[:size]
        self.scan = FiniteScan(self.server.state.upload_schema, buffer)
        return buffer

    def _progress(self, end: int) -> None:
        # Reading the bytes as they land is all this thread does with them; the loop decides.
        self.scan.progress(end)

    def _await_reply(self) -> Message:
        timeouts = self.server.timeouts
        beat = timeouts.heartbeat.total_seconds()
        while True:
            try:
                return self._replies.get(timeout=beat)
            except queue.Empty:
                if self.server.ended and self._replies.empty():
                    return _end_message(self.server.stop_reason or "the federation ended")
                # The request is held (a download waiting for its version): a ping fails at once
                # if the frontend died meanwhile, which frees its rank and its held request.
                self.pipe.send(_PING, timeouts.transfer)

    def _run(self) -> None:
        timeouts = self.server.timeouts
        reason = "closed"
        delivered = False
        try:
            # The request limits (largest upload) are known once the backend has its state_dict.
            while not self.server.prepared.wait(timeouts.tick.total_seconds()):
                if self.server.ended or self.closing:
                    return
            delivered = self.pipe.deliver_to(self._deliver, self._gone)
            if delivered:
                return  # from now on the frontend's thread brings each request
            while True:
                message = self.pipe.recv(self.server.request_limits, timeouts.idle, timeouts.transfer, self._alloc,
                                         self._progress)
                if message.kind is Kind.BYE:
                    reason = "said goodbye"
                    break
                if message.payload is not None:
                    self.free.clear()
                self.replied.clear()
                if self.closing or not self.server.post(_Request(self, message)):
                    self.free.set()
                    end = self.server.stop_reason or "this address was removed"
                    self.pipe.send(_end_message(end), timeouts.transfer)
                    if self.closing:
                        reason = "address removed"
                        break
                    continue
                if not self.pipe.queues_sends:  # otherwise the loop sends the reply itself
                    self.pipe.send(self._await_reply(), timeouts.transfer)
                    self.replied.set()
        except ProtocolError as exc:
            reason = f"invalid message: {exc}"
            self.server.ledger.discard(self.label, reason)
        except TransportError as exc:
            reason = str(exc)
        finally:
            if not delivered:
                self._gone(reason)  # sets replied too

    def _deliver(self, message: Message) -> None:
        """A request from an in-process pipe, on the frontend's thread: check it and handle it now,
        as :meth:`_run` would with one it received."""
        server = self.server
        tick = server.timeouts.tick.total_seconds()
        while not self.joined.wait(tick):  # the loop sees the join before the first request
            if server.ended or self.closing:
                break
        try:
            check_frame(frame_of(message), server.request_limits)
        except ProtocolError as exc:
            reason = f"invalid message: {exc}"
            server.ledger.discard(self.label, reason)
            self._gone(reason)
            return
        if message.kind is Kind.BYE:
            self._gone("said goodbye")
            return
        if message.payload is not None:
            self.free.clear()
        self.replied.clear()
        if self.closing or not server.handle_now(_Request(self, message)):
            self.free.set()
            self.reply(_end_message(server.stop_reason or "this address was removed"))
            if self.closing:
                self._gone("address removed")

    def _gone(self, reason: str) -> None:
        """The pipe is done (the frontend left, broke it or was dropped): release its rank, tell the loop."""
        with self._gone_lock:
            if self._is_gone:
                return
            self._is_gone = True
        self.replied.set()
        self.pipe.close()
        self.lobby.release(self.peer.rank)
        self.server.post(_Left(self, reason), force=True)


class Server:
    """The backend of one API: addresses, pipes, versions, aggregation and the serve loop.

    Args:
        fire: ``fire(event, *args)`` runs the API's steps for an event.
        timeouts: every wait.
        token: the admission token.
        nick_name: the backend's name.
        log: a bound logger.
    """

    def __init__(
        self, fire: Callable[..., None], timeouts: Timeouts, token: bytes, nick_name: str, log: Any,
        asynchronous: Optional[Asynchronous] = None,
    ) -> None:
        self._fire = fire
        self.asynchronous = asynchronous
        self.timeouts = timeouts
        self._token = token
        self.nick_name = nick_name
        self.log = log
        self.ledger = Ledger()
        self.version = 0
        self.received = 0
        self.loop_count = 0
        self.stop_reason: Optional[str] = None
        self.ended = False
        self.state: Optional[SharedState] = None
        self.server_optimizer: Optional[torch.optim.Optimizer] = None
        self.optim_state: Dict[str, torch.Tensor] = {}
        self.request_limits = Limits(REQUESTS, MAX_HEADER_BYTES, 0)
        self.prepared = threading.Event()
        self._events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        # Held while an event is handled, by the loop or by a frontend's thread (handle_now).
        self._loop_lock = threading.RLock()
        self._failure: Optional[BaseException] = None  # raised by handle_now, re-raised by the loop
        self._lock = threading.Lock()
        self._lobbies: Dict[Tuple[str, str], Lobby] = {}
        self._workers: Dict[int, _Worker] = {}
        self._waiting: List[Tuple[_Worker, Transfer]] = []
        self._cache: Optional[Tuple[int, bytes, Pieces]] = None
        self._watcher: Optional[AddressFileWatcher] = None
        self._files: List[Path] = []
        self._clients: Dict[str, _Worker] = {}  # client id -> the worker hosting it
        self._uploaded: Dict[str, int] = {}  # client id -> version of its last accepted upload
        self._mix = [0.0, 0.0]  # asynchronous: sum of staleness-weighted and of plain weights
        self._expected: Optional[Tuple[int, List[str]]] = None  # (version, accumulation order)
        self._next = 0  # index into the expected order of the next upload to accumulate
        self._early: Dict[str, Tuple[Dict[str, torch.Tensor], int, float]] = {}
        self._accumulator: Optional[ThreadPoolExecutor] = None  # started at the first accepted upload
        self._accumulating: Optional[Future] = None
        self._in_event = False
        self._pending_checkpoints: List[Tuple[str, Callable[[], Dict[str, Any]]]] = []
        self._epoch = 0  # bumped when held downloads must be offered again
        self._offered = -1

    # ----------------------------------------------------------------- addresses and joins
    def serve(self, address: Address) -> None:
        """Host or open the store of ``address`` and start admitting frontends there."""
        if address.key in self._lobbies:
            raise ConfigurationError(f"{address} is served already")
        store = open_store(address, backend=True, timeout=self.timeouts.connect)
        lobby = Lobby(
            address, store, self._token, self.timeouts.connect,
            on_admit=self._admit, on_refuse=self._refuse, nick_name=self.nick_name, log=self.log,
        )
        self._lobbies[address.key] = lobby
        if address.scheme == "file":
            self._files.append(Path(address.path))
        self.log.info(f"serving {address.init_method} (group {address.group_name!r}, world_size {address.world_size})")

    def watch(self, path: str) -> None:
        """Serve every address in the file ``path`` and follow its changes while running."""
        watcher = AddressFileWatcher(path, lambda added, removed: self.post(_AddressChange(added, removed), force=True), log=self.log)
        for address in watcher.load():
            self.serve(address)
        watcher.start()
        self._watcher = watcher
        self.log.info(f"watching address file {path}")

    def _admit(self, pipe: Pipe, peer: Peer) -> None:
        lobby = self._lobbies.get(peer.address.key)
        if lobby is None:  # the address was removed while the frontend joined
            pipe.close()
            return
        worker = _Worker(self, pipe, peer, lobby)
        self.post(_Joined(worker), force=True)
        worker.start()

    def _refuse(self, rank: Optional[int], reason: str) -> None:
        self.ledger.refuse(reason)
        self.log.warning(f"refused a frontend (rank {rank}): {reason}")

    def post(self, event: Any, force: bool = False) -> bool:
        """Queue an event for the loop; after the loop ended only forced events are queued."""
        with self._lock:
            if self.ended and not force:
                return False
            self._events.put(event)
            return True

    @property
    def frontends(self) -> List[Peer]:
        """The frontends connected now."""
        return [w.peer for w in self._workers.values()]

    @property
    def clients(self) -> List[str]:
        """The client ids of the connected frontends, in natural order (``"2"`` before ``"10"``)."""
        return sorted(self._clients, key=client_order)

    @property
    def expected(self) -> Optional[List[str]]:
        """The clients whose uploads the current version expects, in accumulation order, or None."""
        if self._expected is None or self._expected[0] != self.version:
            return None
        return list(self._expected[1])

    def expect(self, clients: List[str]) -> None:
        """Declare the clients taking part in the current version (a sampling step does).

        Their accepted uploads are accumulated in this order whatever order they arrive in, so
        the aggregate does not depend on timing (floating-point addition is not associative).
        An upload that arrives before its predecessors is kept aside until they are in.
        """
        self._settle()
        order = [str(c) for c in clients]
        if len(set(order)) != len(order):
            raise ConfigurationError(f"expect(...) needs distinct client ids, got {order[:10]}")
        if self.received:
            raise ConfigurationError(
                f"expect(...) must come before the version's first accepted upload; {self.received} are in already"
            )
        self._expected = (self.version, order)
        self._next = 0
        self._early.clear()
        self._epoch += 1

    # ----------------------------------------------------------------- the model
    def prepare(self, state: SharedState, server_optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Take the shared state to serve; called before the loop runs."""
        if state.aggregator is None:
            raise ConfigurationError("the backend needs an aggregator: call set_aggregator_and_optimizer(...) before run()")
        self.state = state
        self.server_optimizer = server_optimizer
        self.optim_state = state.initial_optim_state()
        self.request_limits = Limits(REQUESTS, MAX_HEADER_BYTES, state.upload_schema.nbytes)
        self._cache = None
        self.prepared.set()

    def _encoded(self) -> Tuple[bytes, Pieces]:
        if self._cache is None or self._cache[0] != self.version:
            header, buffer = encode(
                self.state.download_tensors(self.optim_state), self.state.download_schema,
                kind="model", version=self.version, sender=self.nick_name,
            )
            self._cache = (self.version, header, split(buffer))
        return self._cache[1], self._cache[2]

    def aggregate(self) -> bool:
        """Fold the accepted uploads into a new global version; False if there were none."""
        self._settle()
        if self.received == 0:
            self.log.info(f"nothing to aggregate at version {self.version}: no upload was accepted")
            return False
        self._flush_early(final=True)
        model = self.state.model
        current = {n: t.detach() for n, t in model.items()}
        new = self.state.aggregator.aggregate(current)
        note = ""
        if self.asynchronous is not None:
            alpha = self.asynchronous.alpha * (self._mix[0] / self._mix[1] if self._mix[1] > 0 else 1.0)
            alpha = min(max(alpha, 0.0), 1.0)
            for name, value in new.items():
                base = current[name] if name in current else self.optim_state[name]
                new[name] = mix(base, value, alpha)
            note = f" (asynchronous, mixed with alpha {alpha:.4f})"
        with torch.no_grad():
            if self.server_optimizer is not None:
                self.server_optimizer.zero_grad(set_to_none=False)
                for name, param in self.state.params.items():
                    param.grad = (param.detach() - new[name]).to(param.dtype)
                self.server_optimizer.step()
                rest = [n for n in model if n not in self.state.params]
            else:
                rest = list(model)
            for name in rest:
                model[name].copy_(new[name])
            for wire, tensor in self.optim_state.items():
                tensor.copy_(new[wire])
        count, self.received = self.received, 0
        self._mix = [0.0, 0.0]
        self._expected, self._next = None, 0
        self.version += 1
        self._epoch += 1
        self._cache = None
        self.log.info(f"version {self.version}: aggregated {count} uploads{note}")
        self._fire(Event.AFTER_AGGREGATE)
        return True

    def checkpoint(self, path: str, steps: Callable[[], Dict[str, Any]]) -> None:
        """Save a checkpoint now, or, when asked from a step while the loop handles an event, once
        every step has seen that event (so the saved step state includes the whole event)."""
        if self._in_event:
            self._pending_checkpoints.append((path, steps))
        else:
            self.save_checkpoint(path, steps())

    def _write_pending_checkpoints(self) -> None:
        while self._pending_checkpoints:
            path, steps = self._pending_checkpoints.pop(0)
            self.save_checkpoint(path, steps())

    def save_checkpoint(self, path: str, steps: Optional[Dict[str, Any]] = None) -> None:
        """Write everything needed to continue to ``path`` atomically (temporary file + rename).

        The file holds the global model, the version, the optimizer exchange state, the
        aggregator's accumulation, the server optimizer, the asynchronous buffer's weights, the
        steps' state (``steps``), the accepted uploads of the version and the random generators
        of this process. It loads with ``torch.load(path, weights_only=True)``.
        """
        self._settle()
        target = Path(path)
        numpy_state = np.random.get_state()
        data = {
            "format": CHECKPOINT_FORMAT,
            "version": self.version,
            "state_dict": {n: t.detach().clone() for n, t in self.state.model.items()},
            "optim_state": {n: t.clone() for n, t in self.optim_state.items()},
            "aggregator": self.state.aggregator.state_dict(),
            "server_optimizer": None if self.server_optimizer is None else self.server_optimizer.state_dict(),
            "received": self.received,
            "mix": list(self._mix),
            "uploaded": {c: v for c, v in self._uploaded.items() if v == self.version},
            "expected": None if self.expected is None else {"order": self.expected, "next": self._next},
            "early": {c: {"tensors": t, "num_samples": n, "weight": w} for c, (t, n, w) in self._early.items()},
            "steps": dict(steps or {}),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                          "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
                "python": random.getstate(),
            },
        }
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        torch.save(data, temporary)
        os.replace(temporary, target)
        self.log.info(f"checkpoint of version {self.version} written to {target}")

    def load_checkpoint(self, data: Dict[str, Any], source: str) -> Dict[str, Any]:
        """Continue from a checkpoint written by :meth:`save_checkpoint`; returns the steps' state.

        Raises:
            ConfigurationError: the checkpoint does not fit this model, aggregator or optimizer.
        """
        self._settle()
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise ConfigurationError(f"{source} is not an openfl_api checkpoint of format {CHECKPOINT_FORMAT}")
        model = self.state.model
        saved = data["state_dict"]
        if set(saved) != set(model) or any(saved[n].shape != model[n].shape or saved[n].dtype != model[n].dtype
                                           for n in model):
            raise ConfigurationError(
                f"{source} holds a model that does not match this state_dict (names, shapes or dtypes differ); "
                "resume with the same model definition"
            )
        if set(data["optim_state"]) != set(self.optim_state):
            raise ConfigurationError(f"{source} holds optimizer state {sorted(data['optim_state'])[:4]}; "
                                     f"this backend exchanges {sorted(self.optim_state)[:4]}")
        if (data["server_optimizer"] is None) != (self.server_optimizer is None):
            raise ConfigurationError(f"{source} was written {'with' if data['server_optimizer'] is not None else 'without'} "
                                     "a server optimizer; resume with the same set_aggregator_and_optimizer(...)")
        with torch.no_grad():
            for name, tensor in model.items():
                tensor.copy_(saved[name])
            for name, tensor in self.optim_state.items():
                tensor.copy_(data["optim_state"][name])
        self.state.aggregator.load_state_dict(data["aggregator"])
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(data["server_optimizer"])
        self.version = int(data["version"])
        self.received = int(data["received"])
        self._mix = [float(x) for x in data["mix"]]
        self._uploaded = {str(c): int(v) for c, v in data["uploaded"].items()}
        expected = data["expected"]
        self._expected = None if expected is None else (self.version, list(expected["order"]))
        self._next = 0 if expected is None else int(expected["next"])
        self._early = {c: (e["tensors"], int(e["num_samples"]), float(e["weight"])) for c, e in data["early"].items()}
        rng = data["rng"]
        torch.set_rng_state(rng["torch"])
        numpy_rng = rng["numpy"]
        np.random.set_state(("MT19937", numpy_rng["keys"].numpy().astype(np.uint32), numpy_rng["pos"],
                             numpy_rng["has_gauss"], numpy_rng["gauss"]))
        random.setstate(rng["python"])
        self._cache = None
        self._epoch += 1
        self.log.info(f"resumed from {source}: version {self.version}, {self.received} uploads accepted")
        return dict(data["steps"])

    def stop(self, reason: str) -> None:
        """Ask the loop to stop after the event at hand."""
        if self.stop_reason is None:
            self.stop_reason = reason

    # ----------------------------------------------------------------- the loop
    def run(self) -> None:
        """Serve until a step calls ``stop``; then answer every request with END."""
        if self.state is None:
            raise ConfigurationError("call set_state_dict(...) and set_aggregator_and_optimizer(...) before run()")
        self.log.info(f"serve loop started at version {self.version}")
        tick = self.timeouts.tick.total_seconds()
        try:
            while self.stop_reason is None:
                try:
                    event = self._events.get(timeout=tick)
                except queue.Empty:
                    event = None
                with self._loop_lock:
                    self._reraise()
                    self._turn(event)
            with self._loop_lock:
                self._reraise()
                self._settle()
        except BaseException as exc:
            self.stop(f"{type(exc).__name__} in the serve loop: {exc}")  # kept if a step stopped it first
            raise
        finally:
            with self._loop_lock:
                self._end()

    def _turn(self, event: Any) -> None:
        """One turn of the loop: handle ``event`` (None: a tick), fire ``at_loop``, release held
        downloads, write the checkpoints asked for meanwhile."""
        self._in_event = True
        try:
            if event is not None:
                self._handle(event)
            self.loop_count += 1
            if self.stop_reason is None:
                self._fire(Event.AT_LOOP)
            if self.stop_reason is None:
                self._release_waiting()
        finally:
            self._in_event = False
        self._write_pending_checkpoints()

    def handle_now(self, event: _Request) -> bool:
        """Handle a request on the calling thread (an in-process pipe's frontend), as a turn of the
        loop, one turn at a time with it: no thread switch per message. False, with nothing done,
        once the loop is stopping.

        What a turn raises goes to the loop, which stops and raises it from ``run()``; the
        frontend is told the federation ended.
        """
        with self._loop_lock:
            if self.ended or self.stop_reason is not None:
                return False
            try:
                # The loop thread's torch modes, whatever the frontend's thread has set.
                with torch.inference_mode(False), torch.enable_grad():
                    self._turn(event)
            except BaseException as exc:  # handed to the loop: run() raises it
                self._failure = exc
                self.stop(f"{type(exc).__name__} while handling a request of {event.worker.label}: {exc}")
                event.worker.reply(_end_message(self.stop_reason))
            finally:
                if self.stop_reason is not None:
                    self._events.put(None)  # wake the loop: it ends the federation
            return True

    def _reraise(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _handle(self, event: Any) -> None:
        if not (isinstance(event, _Request) and event.message.kind is Kind.DOWNLOAD):
            self._settle()  # only serving a download may overlap the accumulation of an upload
        if isinstance(event, _Request):
            if event.message.kind is Kind.DOWNLOAD:
                self._download(event.worker, event.message)
            else:
                self._upload(event.worker, event.message)
        elif isinstance(event, _Joined):
            self._workers[id(event.worker)] = event.worker
            peer = event.worker.peer
            self.log.info(f"rank {peer.rank} ({peer.nick_name}) joined on {peer.address.init_method}")
            try:
                self._fire(Event.ON_JOIN, peer)
            finally:
                event.worker.joined.set()
        elif isinstance(event, _Left):
            self._left(event.worker, event.reason)
        elif isinstance(event, _AddressChange):
            self._change_addresses(event.added, event.removed)

    def _left(self, worker: _Worker, reason: str) -> None:
        if self._workers.pop(id(worker), None) is None:
            return
        for client in worker.clients or ():
            if self._clients.get(client) is worker:
                del self._clients[client]
                self._epoch += 1
        for item in [w for w in self._waiting if w[0] is worker]:
            self._waiting.remove(item)
            self.ledger.add(worker.label, "pending", -1)
        level = "INFO" if reason in ("said goodbye", "address removed") else "WARNING"
        self.log.log(level, f"rank {worker.peer.rank} ({worker.peer.nick_name}) left: {reason}")
        if not self.ended:
            self._fire(Event.ON_LEAVE, worker.peer)

    def _change_addresses(self, added: List[Address], removed: List[Address]) -> None:
        reason = "this address was removed from the address file"
        for address in removed:
            if address.key not in self._lobbies:
                continue
            for worker in list(self._workers.values()):
                if worker.peer.address.key == address.key:
                    worker.closing = True
                    self._answer_held(worker, reason)
            lobby = self._lobbies.pop(address.key)
            lobby.end(reason)
            lobby.close()
            self.log.info(f"closed {address.init_method} (group {address.group_name!r}): removed from the address file")
        for address in added:
            try:
                self.serve(address)
            except (ConfigurationError, TransportError) as exc:
                self.log.error(f"cannot serve {address} added to the address file: {exc}")

    def _answer_held(self, worker: _Worker, reason: str) -> None:
        for item in [w for w in self._waiting if w[0] is worker]:
            self._waiting.remove(item)
            self.ledger.add(worker.label, "pending", -1)
            worker.reply(_end_message(reason))

    def _register(self, worker: _Worker, header: Dict[str, Any]) -> Optional[str]:
        """Record the client ids a frontend hosts (its first request); a reason if refused."""
        if worker.clients is not None:
            return None
        named = header.get("clients")
        if named is None:
            clients: Tuple[str, ...] = (worker.label,)
        else:
            if (not isinstance(named, list) or not 0 < len(named) <= MAX_CLIENTS
                    or not all(isinstance(c, str) and 0 < len(c) <= 64 and c.isprintable() for c in named)
                    or len(set(named)) != len(named)):
                return (f"'clients' must list 1 to {MAX_CLIENTS} distinct printable ids of at most 64 characters, "
                        f"got {str(named)[:80]}")
            clients = tuple(named)
            worker.hosts_many = True
        taken = [c for c in clients if c in self._clients]
        if taken:
            owner = self._clients[taken[0]]
            return (f"client id {taken[0]!r} is hosted by {owner.label} already; "
                    "give each frontend its own client ids")
        worker.clients = clients
        for client in clients:
            self._clients[client] = worker
        self._epoch += 1
        if worker.hosts_many:
            self.log.info(f"{worker.label} hosts {len(clients)} clients")
        return None

    def _refuse_request(self, worker: _Worker, reason: str) -> None:
        self.log.warning(f"closing the pipe of {worker.label}: {reason}")
        self.ledger.refuse(f"{worker.label}: {reason}")
        worker.closing = True
        worker.reply(_end_message(f"refused: {reason}"))

    def _download(self, worker: _Worker, message: Message) -> None:
        try:
            header = parse_header(message.header)
            version = header.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise PayloadError(f"download request must carry a version >= 0, got {version!r}"[:200])
        except PayloadError as exc:
            self._refuse_request(worker, f"invalid download request: {exc}")
            return
        refused = self._register(worker, header)
        if refused is not None:
            self._refuse_request(worker, refused)
            return
        transfer = Transfer(rank=worker.peer.rank, nick_name=worker.peer.nick_name, version=version,
                            clients=list(worker.clients))
        if self.asynchronous is None and version > self.version and not self._took_part(worker):
            # A frontend asks for the next version but none of its clients has an upload in the
            # current one: its upload was lost (a restarted backend) or discarded. Serve it the
            # current version instead of holding it for a version that may need its upload.
            self.log.info(f"{worker.label} asks for version {version} but has no accepted upload for version "
                          f"{self.version}; serving version {self.version}")
            transfer.version = self.version
        if self.asynchronous is not None or transfer.version <= self.version:
            self._offer(worker, transfer)
        else:
            self._hold(worker, transfer)
            self.log.debug(f"{worker.label} waits for version {version} (global {self.version})")

    def _took_part(self, worker: _Worker) -> bool:
        return any(self._uploaded.get(c) == self.version for c in worker.clients or ())

    def _hold(self, worker: _Worker, transfer: Transfer) -> None:
        self._waiting.append((worker, transfer))
        self.ledger.add(worker.label, "pending")

    def _offer(self, worker: _Worker, transfer: Transfer) -> None:
        """Serve a download unless a step holds it (a sampling step holds unsampled clients)."""
        transfer.held = False
        self._fire(Event.BEFORE_DOWNLOAD, transfer)
        if transfer.held:
            self._hold(worker, transfer)
            self.log.debug(f"holding the download of {worker.label}: {transfer.reason}")
            return
        self._serve(worker, transfer)

    def _release_waiting(self) -> None:
        if self._offered == self._epoch:
            return
        self._offered = self._epoch
        ready = [item for item in self._waiting if self.asynchronous is not None or item[1].version <= self.version]
        for item in ready:
            self._waiting.remove(item)
            self.ledger.add(item[0].label, "pending", -1)
            self._offer(*item)

    def _serve(self, worker: _Worker, transfer: Transfer) -> None:
        header, pieces = self._encoded()
        transfer.version = self.version
        if worker.hosts_many or transfer.clients != list(worker.clients):
            header = insert_field(header, "clients", list(transfer.clients))
        worker.reply(Message(Kind.MODEL, header, pieces))
        self.ledger.add(worker.label, "downloads")
        self.log.debug(f"served version {self.version} to {worker.label}")
        self._fire(Event.AFTER_DOWNLOAD, transfer)

    def _upload(self, worker: _Worker, message: Message) -> None:
        handed = False
        try:
            handed = self._take_upload(worker, message)
        finally:
            if not handed:
                worker.free.set()  # the loop is done with the pipe's receive buffer

    def _take_upload(self, worker: _Worker, message: Message) -> bool:
        """Validate, judge and answer an upload; True if its accumulation was handed on."""
        empty = torch.empty(0, dtype=torch.uint8)
        try:
            header = parse_header(message.header, schema=self.state.upload_schema)
            payload = decode(header, message.payload if message.payload is not None else empty,
                             self.state.upload_schema, kind="update", scan=worker.scan,
                             reused=not worker.pipe.queues_sends)
            meta = validate_meta(payload.meta)
            refused = self._register(worker, payload.meta)
            client = payload.meta.get("client", worker.clients[0] if worker.clients and not worker.hosts_many else None)
            if refused is None and (not isinstance(client, str) or client not in (worker.clients or ())):
                raise PayloadError(f"meta 'client' must name a client this frontend hosts, got {str(client)[:70]!r}")
        except PayloadError as exc:
            self.ledger.discard(worker.label, f"invalid payload: {exc}")
            self.log.warning(f"rejected the upload of {worker.label}: {exc}")
            worker.reply(Message(Kind.ACK, encode_header({"accepted": False, "reason": f"invalid payload: {exc}",
                                                          "version": self.version})))
            return False
        if refused is not None:
            self._refuse_request(worker, refused)
            return False
        staleness = self.version - payload.version
        transfer = Transfer(
            rank=worker.peer.rank, nick_name=worker.peer.nick_name, version=payload.version,
            num_samples=meta["num_samples"], metrics=meta["metrics"], staleness=staleness, client=client,
        )
        self._fire(Event.BEFORE_UPLOAD, transfer)
        judged = transfer.accepted is None
        if judged:
            self._judge(transfer)
        label = worker.label if not worker.hosts_many else f"{worker.label}:{client}"
        if transfer.accepted:
            self.ledger.add(worker.label, "uploads")
            if self.asynchronous is not None:
                self.log.info(f"accepted the upload of {label}: trained from version {payload.version}, "
                              f"staleness {staleness}, weight {transfer.weight:.4f}")
            else:
                self.log.debug(f"accepted the upload of {label} for version {self.version}")
        else:
            self.ledger.discard(worker.label, transfer.reason)
            self.log.warning(f"discarded the upload of {label}: {transfer.reason}")
        # The verdict is final here: the frontend goes on while the upload is accumulated.
        worker.reply(Message(Kind.ACK, encode_header(
            {"accepted": bool(transfer.accepted), "reason": transfer.reason, "version": self.version})))
        handed = bool(judged and transfer.accepted)
        if handed:
            self._accumulate(worker, lambda: self._accept(client, payload.tensors, transfer.num_samples, transfer.weight),
                             self.state.upload_schema.nbytes)
        self._fire(Event.AFTER_UPLOAD, transfer)
        return handed

    def _accumulate(self, worker: _Worker, job: Callable[[], None], nbytes: int) -> None:
        """Run an accumulation on the accumulation thread, so the loop can serve downloads meanwhile.

        Uploads under :data:`OVERLAP_BYTES` are added on the loop at once.

        At most one runs at a time, and the loop settles it (:meth:`_settle`) before anything else
        reads or changes the aggregator or the accumulation order: every event but a download
        request, ``aggregate``, ``expect``, checkpoints and the end. The pipe receives its next
        payload once the job is done with the receive buffer. The thread starts adding once the
        worker has sent its answer: a thread holding the interpreter lock held up that send by up
        to 3 ms on 2 CPUs.
        """
        self._settle()

        def run(after_reply: bool) -> None:
            try:
                if after_reply:
                    worker.replied.wait(self.timeouts.transfer.total_seconds())
                job()
            finally:
                worker.free.set()

        if nbytes < OVERLAP_BYTES:
            run(False)  # a hand-off to another thread costs more than adding a small upload
            return
        if self._accumulator is None:
            self._accumulator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openfl-accumulate")
        self._accumulating = self._accumulator.submit(run, True)

    def _settle(self, reraise: bool = True) -> None:
        """Wait for the accumulation in progress; re-raise what it raised."""
        pending, self._accumulating = self._accumulating, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as exc:
            if reraise:
                raise
            self.log.error(f"an accumulation failed while the loop was ending: {exc!r}")

    def _judge(self, transfer: Transfer) -> None:
        """Apply the version rule to a valid upload; an accepted one is counted for its version."""
        tag, client = transfer.version, transfer.client
        if tag > self.version:
            transfer.discard(f"future: trained from version {tag} but the global version is only {self.version}")
            return
        if self.asynchronous is not None:
            bound = self.asynchronous.max_staleness
            if bound is not None and transfer.staleness > bound:
                transfer.discard(f"too stale: trained from version {tag}, {transfer.staleness} versions behind "
                                 f"the global version {self.version}; max_staleness is {bound}")
                return
            transfer.weight *= self.asynchronous.weight(transfer.staleness)
        elif tag < self.version:
            transfer.discard(f"stale: trained from version {tag} but the global version is {self.version}")
            return
        elif self._uploaded.get(client) == self.version:
            transfer.discard(f"duplicate: client {client} has an accepted upload for version {self.version} already")
            return
        aggregator = self.state.aggregator
        self._uploaded[client] = self.version
        self.received += 1
        self._mix[0] += aggregator.effective_weight(transfer.num_samples, transfer.weight)
        self._mix[1] += aggregator.effective_weight(transfer.num_samples, 1.0)
        transfer.accepted = True

    def _accept(self, client: str, tensors: Dict[str, torch.Tensor], num_samples: int, weight: float) -> None:
        """Accumulate an accepted upload, in the expected client order when there is one."""
        aggregator = self.state.aggregator
        order = self.expected
        if order is None or client not in order or (order[self._next] == client if self._next < len(order) else False):
            aggregator.add(tensors, num_samples, weight)
            if order is not None and client in order:
                self._next += 1
                self._flush_early(final=False)
            return
        # The upload views the pipe's receive buffer, reused for the next message: keep a copy.
        self._early[client] = ({n: t.clone() for n, t in tensors.items()}, num_samples, weight)
        self._flush_early(final=False)

    def _flush_early(self, final: bool) -> None:
        """Accumulate the kept uploads in the expected order; ``final``: skip the missing ones."""
        order = self.expected
        if order is None:
            return
        while self._next < len(order) and (order[self._next] in self._early or final):
            kept = self._early.pop(order[self._next], None)
            if kept is not None:
                self.state.aggregator.add(*kept)
            self._next += 1

    def _end(self) -> None:
        self._settle(reraise=False)
        if self._accumulator is not None:
            self._accumulator.shutdown(wait=True)
            self._accumulator = None
        with self._lock:
            self.ended = True
        reason = self.stop_reason = self.stop_reason or "the serve loop ended"
        for lobby in self._lobbies.values():
            lobby.end(reason)
        for worker, _ in self._waiting:
            self.ledger.add(worker.label, "pending", -1)
            worker.reply(_end_message(reason))
        self._waiting.clear()
        self._drain_events(reason)
        self.log.info(f"stopped: {reason}")

    def _drain_events(self, reason: str) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, _Request):
                event.worker.free.set()
                event.worker.reply(_end_message(reason))
            elif isinstance(event, _Joined):
                self._join_quietly(event.worker)
            elif isinstance(event, _Left):
                self._left(event.worker, event.reason)

    def _join_quietly(self, worker: _Worker) -> None:
        """Record a join the loop did not get to (it has ended): no log line, no ``on_join``."""
        self._workers[id(worker)] = worker
        worker.joined.set()

    def finish(self) -> None:
        """End the loop if it still runs, wait for frontends to leave, and close everything."""
        if not self.ended:
            self.stop("finish() was called")
            with self._loop_lock:
                self._end()
        deadline = time.monotonic() + self.timeouts.drain.total_seconds()
        while self._workers and time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(event, _Left):
                self._left(event.worker, event.reason)
            elif isinstance(event, _Joined):
                self._join_quietly(event.worker)
            elif isinstance(event, _Request):
                event.worker.reply(_end_message(self.stop_reason))
        for worker in self._workers.values():
            self.log.warning(f"rank {worker.peer.rank} did not leave within {self.timeouts.drain}; closing its pipe")
            worker.closing = True
            worker.pipe.close()
        self._workers.clear()
        if self._watcher is not None:
            self._watcher.stop()
        for lobby in self._lobbies.values():
            lobby.close()
        self._lobbies.clear()
        for path in self._files:
            path.unlink(missing_ok=True)


def newest_checkpoint(prefix: str, log: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Find the newest complete checkpoint ``f"{prefix}.{version}"``; None when there is none.

    Checkpoints are written by rename, so a file that exists is complete; one that still fails to
    load (a disk error, a foreign file) is skipped with a warning and an older one is tried.
    """
    base = Path(prefix)
    folder = base.parent if str(base.parent) else Path(".")
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        name, _, number = path.name.rpartition(".")
        if name == base.name and number.isascii() and number.isdigit():
            found.append((int(number), path))
    for version, path in sorted(found, reverse=True):
        try:
            data = torch.load(path, weights_only=True)
        except Exception as exc:  # a damaged file: fall back to an older checkpoint
            log.warning(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); trying an older one")
            continue
        if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT and data.get("version") == version:
            return str(path), data
        log.warning(f"{path} is not a complete openfl_api checkpoint of format {CHECKPOINT_FORMAT}; skipped")
    return None
