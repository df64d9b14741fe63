"""The backend's serve loop: one event loop that owns the model, the version, the steps and the
aggregator, fed by one I/O thread per pipe.

Pipe threads only move bytes: a thread receives a request, posts it to the loop, waits for the
loop's reply and sends it. The loop validates payloads, applies the version rules, fires the
steps and aggregates, so nothing a step or the aggregator touches is shared between threads.
Downloads are served from an encoding of the global model cached per version.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from openfl_api.address import Address, AddressFileWatcher
from openfl_api.errors import ConfigurationError, PayloadError, TransportError
from openfl_api.payload import MAX_HEADER_BYTES, decode, encode, encode_header, parse_header, validate_meta
from openfl_api.report import Ledger
from openfl_api.state import SharedState
from openfl_api.step import Event, Transfer
from openfl_api.transport.base import REQUESTS, Kind, Limits, Message, Pipe
from openfl_api.transport.rendezvous import Lobby, Peer, open_store

__all__ = ["Server", "Timeouts"]


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
    """

    idle: timedelta = timedelta(minutes=30)
    transfer: timedelta = timedelta(minutes=5)
    connect: timedelta = timedelta(minutes=5)
    drain: timedelta = timedelta(seconds=10)
    tick: timedelta = timedelta(milliseconds=100)

    def __post_init__(self) -> None:
        for name in ("idle", "transfer", "connect", "drain", "tick"):
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


def _end_message(reason: str) -> Message:
    return Message(Kind.END, encode_header({"reason": reason}))


class _Worker:
    """The I/O thread of one pipe: request in, to the loop, reply out."""

    def __init__(self, server: "Server", pipe: Pipe, peer: Peer, lobby: Lobby) -> None:
        self.server = server
        self.pipe = pipe
        self.peer = peer
        self.lobby = lobby
        self.label = f"{peer.address.group_name}/rank{peer.rank}"
        self.closing = False
        self._replies: "queue.Queue[Message]" = queue.Queue()
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._thread = threading.Thread(target=self._run, name=f"openfl-pipe-{self.label}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reply(self, message: Message) -> None:
        """Called by the loop: the answer to the request this worker is waiting on."""
        self._replies.put(message)

    def _alloc(self, size: int) -> torch.Tensor:
        # The loop is done with the previous upload before it replies, so the buffer is reused.
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.uint8)
        return self._buffer[:size]

    def _await_reply(self) -> Message:
        while True:
            try:
                return self._replies.get(timeout=0.5)
            except queue.Empty:
                if self.server.ended and self._replies.empty():
                    return _end_message(self.server.stop_reason or "the federation ended")

    def _run(self) -> None:
        timeouts = self.server.timeouts
        reason = "closed"
        try:
            # The request limits (largest upload) are known once the backend has its state_dict.
            while not self.server.prepared.wait(timeouts.tick.total_seconds()):
                if self.server.ended or self.closing:
                    return
            while True:
                message = self.pipe.recv(self.server.request_limits, timeouts.idle, timeouts.transfer, self._alloc)
                if message.kind is Kind.BYE:
                    reason = "said goodbye"
                    break
                if self.closing or not self.server.post(_Request(self, message)):
                    end = self.server.stop_reason or "this address was removed"
                    self.pipe.send(_end_message(end), timeouts.transfer)
                    if self.closing:
                        reason = "address removed"
                        break
                    continue
                self.pipe.send(self._await_reply(), timeouts.transfer)
        except TransportError as exc:
            reason = str(exc)
        finally:
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

    def __init__(self, fire: Callable[..., None], timeouts: Timeouts, token: bytes, nick_name: str, log: Any) -> None:
        self._fire = fire
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
        self._events: "queue.Queue[Any]" = queue.Queue()
        self._lock = threading.Lock()
        self._lobbies: Dict[Tuple[str, str], Lobby] = {}
        self._workers: Dict[int, _Worker] = {}
        self._waiting: List[Tuple[_Worker, Transfer]] = []
        self._cache: Optional[Tuple[int, bytes, torch.Tensor]] = None
        self._watcher: Optional[AddressFileWatcher] = None
        self._files: List[Path] = []

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

    def _encoded(self) -> Tuple[bytes, torch.Tensor]:
        if self._cache is None or self._cache[0] != self.version:
            header, buffer = encode(
                self.state.download_tensors(self.optim_state), self.state.download_schema,
                kind="model", version=self.version, sender=self.nick_name,
            )
            self._cache = (self.version, header, buffer)
        return self._cache[1], self._cache[2]

    def aggregate(self) -> bool:
        """Fold the accepted uploads into a new global version; False if there were none."""
        if self.received == 0:
            self.log.info(f"nothing to aggregate at version {self.version}: no upload was accepted")
            return False
        model = self.state.model
        new = self.state.aggregator.aggregate({n: t.detach() for n, t in model.items()})
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
        self.version += 1
        self._cache = None
        self.log.info(f"version {self.version}: aggregated {count} uploads")
        self._fire(Event.AFTER_AGGREGATE)
        return True

    def save_checkpoint(self, path: str) -> None:
        """Write the global model, version and exchange state to ``path`` atomically."""
        target = Path(path)
        data = {
            "format": 1,
            "version": self.version,
            "state_dict": {n: t.detach().clone() for n, t in self.state.model.items()},
            "optim_state": {n: t.clone() for n, t in self.optim_state.items()},
            "aggregator": self.state.aggregator.state_dict(),
        }
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        torch.save(data, temporary)
        os.replace(temporary, target)
        self.log.info(f"checkpoint of version {self.version} written to {target}")

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
                if event is not None:
                    self._handle(event)
                self.loop_count += 1
                if self.stop_reason is None:
                    self._fire(Event.AT_LOOP)
                if self.stop_reason is None:
                    self._release_waiting()
        finally:
            self._end()

    def _handle(self, event: Any) -> None:
        if isinstance(event, _Request):
            if event.message.kind is Kind.DOWNLOAD:
                self._download(event.worker, event.message)
            else:
                self._upload(event.worker, event.message)
        elif isinstance(event, _Joined):
            self._workers[id(event.worker)] = event.worker
            peer = event.worker.peer
            self.log.info(f"rank {peer.rank} ({peer.nick_name}) joined on {peer.address.init_method}")
            self._fire(Event.ON_JOIN, peer)
        elif isinstance(event, _Left):
            self._left(event.worker, event.reason)
        elif isinstance(event, _AddressChange):
            self._change_addresses(event.added, event.removed)

    def _left(self, worker: _Worker, reason: str) -> None:
        if self._workers.pop(id(worker), None) is None:
            return
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

    def _download(self, worker: _Worker, message: Message) -> None:
        try:
            version = parse_header(message.header).get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise PayloadError(f"download request must carry a version >= 0, got {version!r}"[:200])
        except PayloadError as exc:
            self.log.warning(f"invalid download request from {worker.label}: {exc}; closing its pipe")
            worker.closing = True
            worker.reply(_end_message(f"invalid request: {exc}"))
            return
        transfer = Transfer(rank=worker.peer.rank, nick_name=worker.peer.nick_name, version=version)
        if version <= self.version:
            self._serve(worker, transfer)
        else:
            self._waiting.append((worker, transfer))
            self.ledger.add(worker.label, "pending")
            self.log.debug(f"{worker.label} waits for version {version} (global {self.version})")

    def _release_waiting(self) -> None:
        ready = [item for item in self._waiting if item[1].version <= self.version]
        for item in ready:
            self._waiting.remove(item)
            self.ledger.add(item[0].label, "pending", -1)
            self._serve(*item)

    def _serve(self, worker: _Worker, transfer: Transfer) -> None:
        self._fire(Event.BEFORE_DOWNLOAD, transfer)
        header, buffer = self._encoded()
        transfer.version = self.version
        worker.reply(Message(Kind.MODEL, header, buffer))
        self.ledger.add(worker.label, "downloads")
        self.log.debug(f"served version {self.version} to {worker.label}")
        self._fire(Event.AFTER_DOWNLOAD, transfer)

    def _upload(self, worker: _Worker, message: Message) -> None:
        empty = torch.empty(0, dtype=torch.uint8)
        try:
            header = parse_header(message.header)
            payload = decode(header, message.payload if message.payload is not None else empty,
                             self.state.upload_schema, kind="update")
            meta = validate_meta(payload.meta)
        except PayloadError as exc:
            self.ledger.discard(worker.label, f"invalid payload: {exc}")
            self.log.warning(f"rejected the upload of {worker.label}: {exc}")
            worker.reply(Message(Kind.ACK, encode_header({"accepted": False, "reason": f"invalid payload: {exc}",
                                                          "version": self.version})))
            return
        transfer = Transfer(
            rank=worker.peer.rank, nick_name=worker.peer.nick_name, version=payload.version,
            num_samples=meta["num_samples"], metrics=meta["metrics"], staleness=self.version - payload.version,
        )
        self._fire(Event.BEFORE_UPLOAD, transfer)
        if transfer.accepted is None:
            if payload.version > self.version:
                transfer.discard(f"future: trained from version {payload.version} but the global version is only {self.version}")
            elif payload.version < self.version:
                transfer.discard(f"stale: trained from version {payload.version} but the global version is {self.version}")
            else:
                self.state.aggregator.add(payload.tensors, meta["num_samples"])
                transfer.accepted = True
                self.received += 1
        if transfer.accepted:
            self.ledger.add(worker.label, "uploads")
            self.log.debug(f"accepted the upload of {worker.label} for version {self.version}")
        else:
            self.ledger.discard(worker.label, transfer.reason)
            self.log.warning(f"discarded the upload of {worker.label}: {transfer.reason}")
        worker.reply(Message(Kind.ACK, encode_header(
            {"accepted": bool(transfer.accepted), "reason": transfer.reason, "version": self.version})))
        self._fire(Event.AFTER_UPLOAD, transfer)

    def _end(self) -> None:
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
                event.worker.reply(_end_message(reason))
            elif isinstance(event, _Joined):
                self._workers[id(event.worker)] = event.worker
            elif isinstance(event, _Left):
                self._left(event.worker, event.reason)

    def finish(self) -> None:
        """End the loop if it still runs, wait for frontends to leave, and close everything."""
        if not self.ended:
            self.stop("finish() was called")
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
                self._workers[id(event.worker)] = event.worker
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
