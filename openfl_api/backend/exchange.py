"""What the serve loop does with requests: serve downloads, judge uploads, aggregate versions.

Every request comes through :meth:`Exchange.download` or :meth:`Exchange.upload`, called by the
loop with its lock held. Downloads are served from the encoding of the current version (or held
until the version they need exists); uploads are validated, judged by the version rules
(:mod:`openfl_api.versions`), answered, and accumulated (:mod:`openfl_api.backend.accumulate`).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from openfl_api.backend.accumulate import Accumulation
from openfl_api.backend.admission import MAX_CLIENTS, Admission
from openfl_api.backend.model import GlobalModel
from openfl_api.backend.worker import Worker, end_message
from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.payload import decode, encode_header, insert_field, parse_header, validate_meta
from openfl_api.step import Event, Transfer
from openfl_api.transport.base import Kind, Message
from openfl_api.versions import Versions

__all__ = ["Exchange", "MAX_CLIENTS", "DUPLICATES_IN_A_ROW"]

#: Duplicate discards in a row from one client before the backend names the likely cause.
DUPLICATES_IN_A_ROW = 3


class Exchange(Admission):
    """Downloads, uploads and versions of one backend.

    Args:
        server: the :class:`~openfl_api.backend.server.Server` whose loop calls it (its ``fire``,
            ``ledger``, ``log`` and ``asynchronous`` are used).
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.log = server.log
        self.versions = Versions(server.asynchronous)
        self.accumulation = Accumulation(server.log)
        self.model: Optional[GlobalModel] = None
        self.clients: Dict[str, Worker] = {}  # client id -> the worker hosting it
        self.waiting: List[Tuple[Worker, Transfer]] = []  # held downloads
        self.epoch = 0  # bumped when held downloads must be offered again
        self._offered = -1
        self._duplicates: Dict[str, int] = {}  # client id -> duplicate discards in a row
        self.started = server.asynchronous is None  # asynchronous mode: the start policy was met
        #: The round config served in every download's header (``api.config``); a step's
        #: ``transfer.config`` entries are added to it for one download.
        self.config: Dict[str, Any] = {}
        #: The upload chain's backend side (:class:`~openfl_api.transforms.backend_side.BackendSide`), or None.
        self.transforms: Any = None

    # ----------------------------------------------------------------- downloads
    def download(self, worker: Worker, message: Message) -> None:
        """Serve a download request now, or hold it until its version exists (synchronous mode)."""
        try:
            header = parse_header(message.header)
            version = header.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise PayloadError(f"download request must carry a version >= 0, got {version!r}"[:200])
        except PayloadError as exc:
            self.refuse(worker, f"invalid download request: {exc}")
            return
        refused = self.register(worker, header)
        if refused is not None:
            self.refuse(worker, *refused)
            return
        current = self.versions.version
        transfer = Transfer(rank=worker.peer.rank, nick_name=worker.peer.nick_name, version=version,
                            clients=list(worker.clients))
        if self.server.asynchronous is None and version > current and not self.versions.took_part(worker.clients):
            # A frontend asks for the next version but none of its clients has an upload in the
            # current one: its upload was lost (a restarted backend) or discarded. Serve it the
            # current version instead of holding it for a version that may need its upload.
            self.log.info(f"{worker.label} asks for version {version} but has no accepted upload for version "
                          f"{current}; serving version {current}")
            transfer.version = current
        if self.server.asynchronous is not None or transfer.version <= current:
            self._offer(worker, transfer)
        else:
            self._hold(worker, transfer)
            self.log.debug(f"{worker.label} waits for version {version} (global {current})")

    def _hold(self, worker: Worker, transfer: Transfer) -> None:
        self.waiting.append((worker, transfer))
        self.server.ledger.add(worker.label, "pending")

    def _offer(self, worker: Worker, transfer: Transfer) -> None:
        """Serve a download unless a step holds it (a sampling step holds unsampled clients)."""
        if not self.started and not self._start():
            self._hold(worker, transfer)
            return
        transfer.held = False
        self.server.fire(Event.BEFORE_DOWNLOAD, transfer)
        if transfer.held:
            self._hold(worker, transfer)
            self.log.debug(f"holding the download of {worker.label}: {transfer.reason}")
            return
        self._serve(worker, transfer)

    def ready(self) -> int:
        """Frontends that have asked for a model (registered), so are ready to train."""
        return sum(1 for worker in self.server.workers.values() if worker.clients is not None)

    def _start(self) -> bool:
        """Asynchronous mode: start serving once the start policy's frontends have asked for a model."""
        have, need = self.ready(), self.server.start_frontends()
        if have < need:
            return False
        self.started = True
        self.log.info(f"asynchronous start: {have} frontends ready (min_frontends={need}); serving version "
                      f"{self.versions.version}")
        return True

    def release_waiting(self) -> None:
        """Offer the held downloads again if anything they may wait for changed."""
        if self._offered == self.epoch:
            return
        self._offered = self.epoch
        asynchronous = self.server.asynchronous is not None
        ready = [item for item in self.waiting if asynchronous or item[1].version <= self.versions.version]
        for item in ready:
            if self.server.stop_reason is not None:
                break  # a step stopped the federation: no further event fires
            self.waiting.remove(item)
            self.server.ledger.add(item[0].label, "pending", -1)
            self._offer(*item)

    def _serve(self, worker: Worker, transfer: Transfer) -> None:
        version = self.versions.version
        header, pieces = self.model.encoded(version)
        transfer.version = version
        if worker.hosts_many or transfer.clients != list(worker.clients):
            header = insert_field(header, "clients", list(transfer.clients))
        config = {**self.config, **transfer.config}
        if config:
            header = _with_config(header, config)
        if self.transforms is not None:  # the upload chain's round config (clip bound, secure aggregation's run)
            header = insert_field(header, "transforms", self.transforms.fields())
        transfer.nbytes = len(header) + pieces.nbytes
        worker.reply(Message(Kind.MODEL, header, pieces))
        self.server.ledger.add(worker.label, "downloads")
        self.log.debug(f"served version {version} to {worker.label}")
        self.server.fire(Event.AFTER_DOWNLOAD, transfer)

    def answer_held(self, worker: Worker, reason: str, code: str = "ended") -> None:
        """Answer ``worker``'s held download with END (``code="changed"``: join again)."""
        for item in [w for w in self.waiting if w[0] is worker]:
            self.waiting.remove(item)
            self.server.ledger.add(worker.label, "pending", -1)
            worker.reply(end_message(reason, code))

    # ----------------------------------------------------------------- uploads
    def upload(self, worker: Worker, message: Message) -> None:
        """Validate, judge and answer an upload, then accumulate it if it was accepted."""
        handed = False
        try:
            handed = self._take_upload(worker, message)
        finally:
            if not handed:
                worker.free.set()  # the loop is done with the pipe's receive buffer

    def _take_upload(self, worker: Worker, message: Message) -> bool:
        """Returns True if the accumulation was handed on (it frees the receive buffer itself)."""
        server, versions, schema = self.server, self.versions, self.model.state.upload_schema
        wire = self.transforms
        if wire is not None:  # upload transforms: the payload holds what the chain puts on the wire
            schema = wire.wire_schema
        try:
            header = parse_header(message.header, schema=schema)
            payload = decode(header, message.payload if message.payload is not None else torch.empty(0, dtype=torch.uint8),
                             schema, kind="update", scan=worker.scan, reused=not worker.pipe.queues_sends)
            meta = validate_meta(payload.meta)
            refused = self.register(worker, payload.meta)
            client = payload.meta.get("client", worker.clients[0] if worker.clients and not worker.hosts_many else None)
            if refused is None and (not isinstance(client, str) or client not in (worker.clients or ())):
                raise PayloadError(f"meta 'client' must name a client this frontend hosts, got {str(client)[:70]!r}")
            if refused is None and wire is not None:
                wire.admit(payload.meta, client)
        except PayloadError as exc:
            server.ledger.discard(worker.label, f"invalid payload: {exc}")
            self.log.warning(f"rejected the upload of {worker.label}: {exc}")
            worker.reply(Message(Kind.ACK, encode_header({"accepted": False, "reason": f"invalid payload: {exc}",
                                                          "version": versions.version})))
            return False
        if refused is not None:
            self.refuse(worker, *refused)
            return False
        transfer = Transfer(
            rank=worker.peer.rank, nick_name=worker.peer.nick_name, version=payload.version,
            num_samples=meta["num_samples"], metrics=meta["metrics"], staleness=versions.version - payload.version,
            client=client, nbytes=len(message.header) + (0 if message.payload is None else message.payload.numel()),
        )
        server.fire(Event.BEFORE_UPLOAD, transfer)
        judged = transfer.accepted is None
        if judged:
            self._judge(transfer)
        label = worker.label if not worker.hosts_many else f"{worker.label}:{client}"
        if transfer.accepted:
            server.ledger.add(worker.label, "uploads")
            self._duplicates.pop(client, None)
            if server.asynchronous is not None:
                self.log.info(f"accepted the upload of {label}: trained from version {payload.version}, "
                              f"staleness {transfer.staleness}, weight {transfer.weight:.4f}")
            else:
                self.log.debug(f"accepted the upload of {label} for version {versions.version}")
        else:
            server.ledger.discard(worker.label, transfer.reason)
            self.log.warning(f"discarded the upload of {label}: {transfer.reason}")
            self._count_duplicate(label, client, transfer.reason)
        # The verdict is final here: the frontend goes on while the upload is accumulated.
        worker.reply(Message(Kind.ACK, encode_header(
            {"accepted": bool(transfer.accepted), "reason": transfer.reason, "version": versions.version})))
        handed = bool(judged and transfer.accepted)
        tensors, peak = payload.tensors, payload.peak
        if handed and wire is not None:  # undo the chain: tensors for the aggregator, or None (secure aggregation)
            tensors = wire.incoming(tensors, payload.meta, client, transfer.num_samples,
                                    (len(message.header), schema.nbytes))
            peak = payload.peak if tensors is not None and schema is self.model.state.upload_schema else None
            handed = tensors is not None
        if handed:
            self.accumulation.add(worker, tensors, transfer.num_samples, transfer.weight, schema.nbytes, peak,
                                  context=self._context(transfer))
        server.fire(Event.AFTER_UPLOAD, transfer)
        return handed

    def _context(self, transfer: Transfer) -> Dict[str, Any]:
        """What an aggregator's ``add(..., context=...)`` learns of an accepted upload besides its
        tensors: the client, the version it was trained from, its staleness, and whether the
        backend runs asynchronously (with its ``max_staleness``)."""
        asynchronous = self.server.asynchronous
        return {"client": transfer.client, "version": transfer.version, "staleness": transfer.staleness,
                "asynchronous": asynchronous is not None,
                "max_staleness": 0 if asynchronous is None else asynchronous.max_staleness}

    def _judge(self, transfer: Transfer) -> None:
        verdict = self.versions.judge(transfer.version, transfer.client)
        if not verdict.accepted:
            transfer.discard(verdict.reason)
            return
        transfer.weight *= verdict.weight
        aggregator = self.model.aggregator
        self.versions.accept(transfer.client, aggregator.effective_weight(transfer.num_samples, transfer.weight),
                             aggregator.effective_weight(transfer.num_samples, 1.0))
        transfer.accepted = True

    def _count_duplicate(self, label: str, client: str, reason: str) -> None:
        if not reason.startswith("duplicate"):
            self._duplicates.pop(client, None)
            return
        count = self._duplicates[client] = self._duplicates.get(client, 0) + 1
        if count == DUPLICATES_IN_A_ROW:
            self.log.warning(
                f"{label}: {count} uploads in a row were duplicates of version {self.versions.version}; its training "
                "loop most likely does not call api.update_version() after api.upload(), so it trains the same "
                "version again and again"
            )

    # ----------------------------------------------------------------- versions
    def withdraw(self, clients: List[str]) -> int:
        """Take back the accepted uploads of ``clients`` for the current version (their secure
        aggregation round failed); returns how many. They may upload for the version again, so
        their held downloads are served the current version."""
        taken = self.versions.withdraw(clients)
        gone = set(clients)
        for worker, transfer in self.waiting:
            if gone & set(worker.clients or ()):
                transfer.version = min(transfer.version, self.versions.version)
        self.epoch += 1
        return taken

    def expect(self, clients: List[str]) -> None:
        """Declare the clients taking part in the current version."""
        self.accumulation.expect(clients, self.versions.version)
        self.epoch += 1

    def aggregate(self) -> bool:
        """Fold the accepted uploads into a new global version now; False if there were none."""
        started = time.perf_counter()
        versions = self.versions
        self.accumulation.settle()
        wire = self.transforms
        if wire is not None and not wire.ready():
            self.log.debug(f"version {versions.version} waits for secure aggregation's round before it is aggregated")
            return False
        if versions.accepted == 0:
            self.log.info(f"nothing to aggregate at version {versions.version}: no upload was accepted")
            return False
        if wire is not None:
            wire.before_aggregate(self.model.aggregator)
        new = self.model.aggregator.aggregate(self.model.current())
        if wire is not None:
            new = wire.after_aggregate(new, versions.accepted)
        # An aggregator that applies each update with a server step of its own is not mixed too.
        alpha = None if getattr(self.model.aggregator, "steps_server", False) else versions.mixing()
        self.model.step(new, alpha)
        count = versions.advance()
        self.server.clock.aggregated(started, time.perf_counter())
        self.epoch += 1
        note = "" if alpha is None else f" (asynchronous, mixed with alpha {alpha:.4f})"
        self.log.info(f"version {versions.version}: aggregated {count} uploads{note}")
        self.server.fire(Event.AFTER_AGGREGATE)
        return True


def _with_config(header: bytes, config: Dict[str, Any]) -> bytes:
    """``header`` with the round config a step set in ``before_download`` (a JSON object)."""
    try:
        return insert_field(header, "config", config)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"transfer.config must be a JSON object of str keys and JSON values (finite "
                                 f"numbers, str, bool, lists, objects); a step set {str(config)[:120]}: {exc}") from exc
