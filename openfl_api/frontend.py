"""The frontend's side: join the backend, download the global model in place, upload updates.

Every call is one request and one reply over the frontend's pipe. ``download()`` asks for a
model whose version is at least the local version (the synchronous rule keeps clients in
lock-step); the reply is validated against the local schema before it is copied into the user's
tensors. The end of the federation is not an error: the calls return False. A refusal is:
a frontend whose model differs from the backend's gets a :class:`ConfigurationError` naming the
first differences, one refused for another reason an :class:`AdmissionError`.

The first request registers the frontend: it carries the layout of its model (``schema``) and,
with virtual clients, the ids it hosts. While a reply takes long, a line every ``status`` interval
says what the frontend waits for and what the backend last said of its version. On the main
thread the pipe's blocking waits run on a helper thread, so Ctrl-C is never held up.

Between requests a :class:`~openfl_api.transport.heartbeat.Beat` sends heartbeats that the backend
echoes; while a reply is awaited the backend pings. When the backend falls silent for the link
timeout the link counts as lost: the frontend says so at once, and its next request joins again
(for up to ``reconnect``) and is repeated.
"""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

from openfl_api.address import Address
from openfl_api.errors import AdmissionError, ConfigurationError, PayloadError, TransportError, WireError
from openfl_api.ledger import Ledger
from openfl_api.payload import (
    MAX_HEADER_BYTES, FiniteScan, Schema, decode, dtype_name, encode, encode_header, encode_pieces, on_cuda,
    parse_header, validate_meta,
)
from openfl_api.payload.config import check_config
from openfl_api.reporting import Reporting
from openfl_api.state import SharedState
from openfl_api.step import Event, Transfer
from openfl_api.timeouts import Timeouts
from openfl_api.transport.base import Kind, Limits, Message, Pieces, Pipe, Silence
from openfl_api.transport.heartbeat import Beat
from openfl_api.transport.rendezvous import join
from openfl_api.transport.store import open_store
from openfl_api.waiting import Helper, interruptible, logged

__all__ = ["Client", "check_upload_meta"]

MAX_REJOINS = 3  # joins again per request before a broken pipe is reported


class Client(Reporting):
    """The frontend of one API: one pipe to the backend and a local version.

    Args:
        fire: ``fire(event, *args)`` runs the API's steps.
        timeouts: every wait.
        log: a bound logger.
        clients: the virtual client ids this frontend hosts, or None: it is one client.
        reconnect: how long to keep trying to join a backend that went away without ending.
    """

    def __init__(self, fire: Callable[..., None], timeouts: Timeouts, log: Any,
                 clients: Optional[List[str]] = None, reconnect: timedelta = timedelta(0),
                 protect_wire: Optional[bool] = None) -> None:
        self._fire = fire
        self.hosted = clients  # virtual client ids, or None: this frontend is one client
        self.selected: List[str] = list(clients or [])
        self._registered = False
        self.reconnect = reconnect
        self.protect_wire = protect_wire
        self.timeouts = timeouts
        self.log = log
        self.ledger = Ledger()
        self.version = 0
        self.ended = False
        self.end_reason = ""
        self.backend_name = ""
        self.address: Optional[Address] = None
        self._pipe: Optional[Pipe] = None
        self._beat: Optional[Beat] = None
        self._store: Any = None
        self._ended_on_store: Callable[[], Optional[bool]] = lambda: None
        self._token = b""
        self._nick_name = ""
        self._rx = torch.empty(0, dtype=torch.uint8)
        self._tx: Optional[torch.Tensor] = None
        self._scan_schema: Optional[Schema] = None
        self.scan: Optional[FiniteScan] = None  # watches the payload of the reply being received
        self._io: Optional[Helper] = None  # runs the pipe's blocking waits when on the main thread
        self._backend_said = ""  # the status in the backend's last ping
        self._uploaded_from: Optional[int] = None  # the version the last upload was trained from
        self.downloaded: Optional[int] = None  # the version of the model downloaded last
        self.config: Dict[str, Any] = {}  # the round config served with the model downloaded last
        self.final: Optional[str] = None  # set when that model is the final one (served for evaluation only)
        self._sent_reports: Dict[str, Any] = {}  # the reports of that model, sent again to a backend joined again
        self._schema: Optional[List[List[Any]]] = None  # the model's layout, sent when registering
        #: The upload chain's frontend side (:class:`~openfl_api.transforms.frontend_side.FrontendSide`), or None.
        self.transforms: Any = None

    def connect(self, address: Address, token: bytes, nick_name: str, timeout: Optional[timedelta] = None) -> None:
        """Join the backend at ``address``; blocks until admitted."""
        timeout = timeout or self.timeouts.connect
        self._store = open_store(address, backend=False, timeout=timeout, log=self.log)
        self._pipe, self.backend_name, self._ended_on_store = join(
            address, self._store, token, nick_name, timeout, log=self.log, status=self.timeouts.status,
            protect_wire=self.protect_wire)
        self.address, self._token, self._nick_name = address, token, nick_name
        self._registered = False
        if self._pipe.heartbeats:
            self._pipe.link = self.timeouts.link
            self._beat = Beat(self._pipe, self.timeouts.heartbeat, self.timeouts.link, self._link_lost)
        self.log.info(f"joined {self.backend_name} at {address.init_method} as rank {address.rank}")

    def _link_lost(self, reason: Exception) -> None:
        """From the heartbeat's thread: say at once that the backend fell silent."""
        self.log.warning(f"lost the link to {self.backend_name} at {self.address.init_method}: {reason}; "
                         f"the next request joins again (for up to reconnect={self.reconnect})")

    def _drop_pipe(self) -> None:
        if self._beat is not None:
            self._beat.stop()
            self._beat = None
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def _rejoin(self, cause: TransportError, moved: bool = False) -> bool:
        """Join a restarted backend again, with back-off, for up to ``reconnect`` (``moved``: the
        backend asked for it, for at least ``connect_timeout``); True if joined."""
        patience = max(self.reconnect, self.timeouts.connect) if moved else self.reconnect
        deadline = time.monotonic() + patience.total_seconds()
        delay = 0.2
        if moved:
            self.log.info(f"the backend at {self.address.init_method} says: {cause}; joining again")
        else:
            self.log.warning(f"lost the backend at {self.address.init_method} ({cause}); "
                             f"trying to join again for up to {self.reconnect}")
        self._drop_pipe()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.connect(self.address, self._token, self._nick_name,
                             timeout=timedelta(seconds=max(0.5, min(left, self.timeouts.connect.total_seconds()))))
                return True
            except AdmissionError as exc:
                # After a lost link the backend may not have dropped this rank's old pipe yet.
                if getattr(exc, "code", None) != "duplicate":
                    raise
                self.log.debug(f"join again refused: {exc}; the backend still holds the old pipe")
            except (TransportError, RuntimeError) as exc:
                self.log.debug(f"join again failed: {exc}")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 5.0)

    def _alloc(self, size: int) -> torch.Tensor:
        if self._rx.numel() < size:
            self._rx = torch.zeros(size, dtype=torch.uint8)  # zero padding keeps the finite check on its fast path
        buffer = self._rx[:size]
        if self._scan_schema is not None:
            self.scan = FiniteScan(self._scan_schema, buffer)
        return buffer

    def _progress(self, end: int) -> None:
        if self.scan is not None:
            self.scan.progress(end)

    def _exchange(self, request: Union[Message, Callable[[], Message]], limits: Limits,
                  schema: Optional[Schema] = None, what: str = "the backend's answer") -> Optional[Message]:
        """Send a request (or build it: ``request()``) and receive its reply; None once ended.

        A broken pipe with no end recorded on the store means the backend went away (or dropped
        this frontend): join again for up to ``reconnect`` and repeat the request. ``what`` names
        the reply in the lines logged while it takes long. ``schema``: the layout of the reply's
        payload, checked for finite values while it arrives (``self.scan``).

        Raises:
            ConfigurationError: the backend refused this frontend's model.
            AdmissionError: the backend refused this frontend for another reason.
        """
        self._scan_schema, self.scan = schema, None
        if isinstance(request, Message):
            request = (lambda message: lambda: message)(request)
        rejoins = 0
        limits = Limits(limits.kinds | {Kind.PING}, limits.max_header, limits.max_payload)
        while True:
            try:
                with logged(self.log, self.timeouts.status, lambda: self._waiting_for(what)):
                    reply = self._round_trip(request(), limits)
                if reply.kind is Kind.END and _header_or_empty(reply.header).get("code") == "changed":
                    # The backend's address-file entry changed: it serves it again; join its new session.
                    reason = str(_header_or_empty(reply.header).get("reason", ""))[:500]
                    if rejoins < MAX_REJOINS and self._rejoin(TransportError(reason), moved=True):
                        rejoins += 1
                        continue
                    raise TransportError(f"could not join {self.address.init_method} again after the backend "
                                         f"changed it: {reason}")
                break
            except TransportError as exc:
                if isinstance(exc, WireError):
                    self.ledger.refuse_on_wire(exc.reason)
                    self.log.warning(f"refused a message from {self.backend_name}: {exc}")
                if isinstance(exc, Silence):
                    self._link_lost(exc)
                ended = self._ended_on_store()
                if ended:
                    self._end(f"the backend closed the pipe ({exc})")
                    return None
                if self.reconnect > timedelta(0) and rejoins < MAX_REJOINS and self._rejoin(exc):
                    rejoins += 1  # a request the backend keeps dropping is not repeated forever
                    self._report_again(request)  # a restarted backend may have lost them
                    continue
                if ended is None:
                    self._end(f"lost the backend at {self.address.init_method} and could not reach it again "
                              f"within reconnect={self.reconnect}: {exc}")
                    return None
                raise TransportError(
                    f"lost the backend at {self.address.init_method}, which did not record an end: {exc}"
                ) from exc
        if reply.kind is Kind.END:
            fields = _header_or_empty(reply.header)
            reason = str(fields.get("reason", "the federation ended"))[:2000]
            code = fields.get("code")
            if code in ("refused", "mismatch"):
                self._end(reason, quiet=True)
                self.log.error(f"the backend {reason}")
                raise (ConfigurationError if code == "mismatch" else AdmissionError)(f"the backend {reason}")
            self._end(reason)
            return None
        return reply

    def _round_trip(self, message: Message, limits: Limits) -> Message:
        """Send ``message`` and receive the reply, skipping the backend's pings (remembering their status)."""
        pipe, beat = self._pipe, self._beat
        if pipe is None:
            raise TransportError("the pipe to the backend was closed after an earlier failure")
        if pipe.queues_sends:  # in-process: the backend answers on this thread, nothing blocks long
            pipe.send(message, self.timeouts.transfer)
            return self._receive(pipe, limits)
        if self._io is None:
            self._io = Helper("openfl-frontend-io")

        def call() -> Message:
            with beat.request() if beat is not None else contextlib.nullcontext():
                pipe.send(message, self.timeouts.transfer)
                return self._receive(pipe, limits)

        return interruptible(call, self._io)

    def _receive(self, pipe: Pipe, limits: Limits) -> Message:
        # The backend pings while it handles or holds the request: silence means a cut link.
        idle = self.timeouts.link if pipe.heartbeats else self.timeouts.idle
        limits = Limits(limits.kinds | {Kind.HEARTBEAT}, limits.max_header, limits.max_payload)
        reply = pipe.recv(limits, idle, self.timeouts.transfer, self._alloc, self._progress)
        while reply.kind in (Kind.PING, Kind.HEARTBEAT):  # the backend checks on us while it works
            status = _header_or_empty(reply.header).get("status")
            if isinstance(status, str):
                self._backend_said = status[:500]
            reply = pipe.recv(limits, idle, self.timeouts.transfer, self._alloc, self._progress)
        return reply

    def _waiting_for(self, what: str) -> str:
        said = f"; the backend says: {self._backend_said}" if self._backend_said else ""
        return f"{what} from {self.backend_name or 'the backend'} at {self.address.init_method}{said}"

    def _end(self, reason: str, quiet: bool = False) -> None:
        self.ended = True
        self.end_reason = reason
        if not quiet:
            self.log.info(f"federation over: {reason}")

    def download(self, state: SharedState, rank: int, nick_name: str) -> bool:
        """Load a global model whose version is >= the local one; False once it has ended."""
        if self.final is not None and not self.ended:
            self._end(self.final)  # the final model was served: there is no later one
        if self.ended:
            return False
        transfer = Transfer(rank=rank, nick_name=nick_name, version=self.version)
        self._fire(Event.BEFORE_DOWNLOAD, transfer)

        def request() -> Message:
            fields: Dict[str, Any] = {"version": self.version}
            if not self._registered:
                fields.update(self._registration(state))
            return Message(Kind.DOWNLOAD, encode_header(fields))

        limits = Limits(frozenset({Kind.MODEL, Kind.END}), MAX_HEADER_BYTES, state.download_schema.nbytes)
        self._backend_said = ""
        reply = self._exchange(request, limits, state.download_schema,
                               what=f"the model of version {self.version} or later")
        if reply is None:
            return False
        self._registered = True
        buffer = reply.payload if reply.payload is not None else torch.empty(0, dtype=torch.uint8)
        try:
            header = parse_header(reply.header, schema=state.download_schema)
            payload = decode(header, buffer, state.download_schema, kind="model", scan=self.scan,
                             reused=not self._pipe.queues_sends)
            selected = self._check_selected(header.get("clients"))
            config = check_config(_check_config(header.get("config")), error=PayloadError,
                                  where="the header field 'config'")
            if self.transforms is not None:  # the reference of the next update, and the chain's round config
                self.transforms.downloaded(payload.tensors, header.get("transforms"))
        except PayloadError as exc:
            raise PayloadError(f"the backend sent an invalid model; nothing was loaded: {exc}") from exc
        self.selected = transfer.clients = selected
        self.config = transfer.config = config
        self.final = config.get("final")
        state.apply(payload.tensors)
        if payload.version == self._uploaded_from and self.hosted is None:
            self.log.warning(
                f"downloaded version {payload.version} again, which this frontend has already uploaded an update "
                "for: call api.update_version() after api.upload(), so that download() waits for the next version"
            )
        self.version = self.downloaded = transfer.version = payload.version
        self.ledger.add(self.backend_name, "downloads")
        self.log.debug(f"downloaded version {payload.version}")
        self._fire(Event.AFTER_DOWNLOAD, transfer)
        return True

    def _registration(self, state: SharedState) -> Dict[str, Any]:
        """What the first request of a pipe carries: the model's layout, and the hosted client ids."""
        if self._schema is None:
            self._schema = [[s.name, dtype_name(s.dtype), list(s.shape)] for s in state.upload_schema.specs]
        fields: Dict[str, Any] = {"schema": self._schema}
        if self.hosted is not None:
            fields["clients"] = self.hosted
        if self.transforms is not None:
            fields["transforms"] = self.transforms.registration()
        return fields

    def _check_selected(self, named: Any) -> List[str]:
        hosted = self.hosted if self.hosted is not None else []
        if named is None:
            return list(hosted)
        if not isinstance(named, list) or not all(isinstance(c, str) for c in named):
            raise PayloadError(f"header field 'clients' must be a list of client ids, got {str(named)[:80]}")
        if self.hosted is not None:
            unknown = sorted(set(named) - set(hosted))
            if unknown:
                raise PayloadError(f"the backend selected clients {unknown[:5]} that this frontend does not host")
        return list(named)

    def upload(
        self, state: SharedState, rank: int, nick_name: str, num_samples: int, metrics: Mapping[str, float],
        client: Optional[str] = None,
    ) -> bool:
        """Send the local state tagged with the local version; False once the federation ended."""
        if self.final is not None and not self.ended:
            self._end(self.final)  # the model trained from was the final one: no update is taken
        if self.ended:
            return False
        if self.hosted is not None:
            if client is None:
                if len(self.hosted) != 1:
                    raise ConfigurationError(
                        "this frontend hosts several clients: say whose update this is, upload(client=...)")
                client = self.hosted[0]
            elif client not in self.hosted:
                raise ConfigurationError(f"upload(client={client!r}): this frontend hosts no such client")
        elif client is not None:
            raise ConfigurationError("upload(client=...) needs API(clients=[...]) on this frontend")
        transfer = Transfer(rank=rank, nick_name=nick_name, version=self.version,
                            num_samples=num_samples, metrics=dict(metrics), client=client or "")
        self._fire(Event.BEFORE_UPLOAD, transfer)
        schema = state.upload_schema
        meta: Dict[str, Any] = {"num_samples": num_samples, "metrics": dict(metrics)}
        if client:
            meta["client"] = client
        tensors = state.upload_tensors()
        if self.transforms is not None:  # upload transforms: what goes on the wire instead of the state
            who = client or f"{self.address.group_name}/rank{self.address.rank}"  # the id the backend knows
            prepared = self.transforms.outgoing(tensors, self.version, who, num_samples, self._store,
                                                self._ended_on_store)
            if prepared is None and self.transforms.ended:
                self._end(self.transforms.skipped)
                return False
            if prepared is None:
                transfer.accepted, transfer.reason = False, self.transforms.skipped
                self.ledger.discard(self.backend_name, transfer.reason)
                self.log.warning(f"this upload takes no part: {transfer.reason}")
                self._uploaded_from = self.version
                self._fire(Event.AFTER_UPLOAD, transfer)
                return True
            tensors, schema, extra = prepared
            meta.update(extra)
        pieces: Union[Pieces, torch.Tensor]
        if self._pipe.queues_sends:
            # The pipe keeps what it is sent in memory: copy once, into a buffer it may keep.
            header, pieces = encode(tensors, schema, kind="update", version=self.version,
                                    sender=nick_name, meta=meta)
        else:
            pinned = on_cuda(tensors.values())  # CUDA tensors reach the host through page-locked memory
            if self._tx is None or self._tx.numel() < schema.nbytes or self._tx.is_pinned() != pinned:
                self._tx = torch.zeros(schema.nbytes, dtype=torch.uint8, pin_memory=pinned)
            # Large tensors go to the pipe straight from the model; upload() returns only once they are sent.
            header, pieces = encode_pieces(tensors, schema, kind="update", version=self.version,
                                           sender=nick_name, meta=meta, out=self._tx)

        owned = isinstance(pieces, torch.Tensor)  # encoded for this upload alone

        def request() -> Message:
            if self._registered:
                return Message(Kind.UPLOAD, header, pieces, owned=owned)
            # A backend joined again has not heard of this frontend yet.
            fields = parse_header(header)
            fields["meta"].update(self._registration(state))
            return Message(Kind.UPLOAD, encode_header(fields), pieces, owned=owned)

        reply = self._exchange(request, Limits(frozenset({Kind.ACK, Kind.END}), MAX_HEADER_BYTES, 0),
                               what=f"the answer to the upload trained from version {self.version}")
        if reply is None:
            return False
        self._registered = True
        self._uploaded_from = self.version
        ack = _header_or_empty(reply.header)
        transfer.accepted = bool(ack.get("accepted"))
        transfer.reason = str(ack.get("reason", ""))[:500]
        if self.transforms is not None:  # bytes on the wire; secure aggregation's unmask shares
            self.transforms.sent(len(header) + schema.nbytes)
            self.transforms.answered(transfer.accepted)
        if transfer.accepted:
            self.ledger.add(self.backend_name, "uploads")
            self.log.debug(f"uploaded an update trained from version {self.version}")
        else:
            self.ledger.discard(self.backend_name, transfer.reason or "discarded")
            self.log.warning(f"the backend discarded this upload: {transfer.reason}")
        self._fire(Event.AFTER_UPLOAD, transfer)
        return True

    def finish(self, interrupted: bool = False) -> None:
        """Say goodbye to the backend and release the pipe; ``interrupted``: at once, no goodbye
        (a wait of the pipe may still be blocked on the helper thread)."""
        if self._pipe is None:
            return
        beat, self._beat = self._beat, None
        if beat is not None:
            beat.stop()
        if not interrupted:
            try:
                with beat.request() if beat is not None else contextlib.nullcontext():
                    self._pipe.send(Message(Kind.BYE), self.timeouts.transfer)
            except TransportError:
                pass
            self._pipe.close()
        self._pipe = None
        self._store = None


def _header_or_empty(raw: bytes) -> Dict[str, Any]:
    try:
        return parse_header(raw)
    except PayloadError:
        return {}


def _check_config(config: Any) -> Dict[str, Any]:
    """The round config of a served model: absent, or a JSON object whose ``final`` is a str."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise PayloadError(f"header field 'config' must be a JSON object, got {type(config).__name__}")
    if "final" in config and not isinstance(config["final"], str):
        raise PayloadError(f"config 'final' must be the reason the federation stops (a str), got {config['final']!r}"[:200])
    return dict(config)


def check_upload_meta(num_samples: Any, metrics: Any) -> Dict[str, Any]:
    """Validate ``upload()``'s arguments before anything is sent, with the backend's own check.

    One-element tensors among the metrics (a loss) are taken as their value.
    """
    if isinstance(metrics, Mapping):
        metrics = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in metrics.items()}
    return validate_meta({"num_samples": num_samples, "metrics": metrics}, error=ConfigurationError, where="upload")
