"""The frontend's side: join the backend, download the global model in place, upload updates.

Every call is one request and one reply over the frontend's pipe. ``download()`` asks for a
model whose version is at least the local version (the synchronous rule keeps clients in
lock-step); the reply is validated against the local schema before it is copied into the user's
tensors. Between processes an upload is pipelined: ``upload()`` returns once the update is copied
into the send buffer, and the next call on the pipe awaits its answer (:meth:`Client._settle`).
The end of the federation is not an error: the calls return False. A refusal is:
a frontend whose model differs from the backend's gets a :class:`ConfigurationError` naming the
first differences, one refused for another reason an :class:`AdmissionError`.

The first request registers the frontend: it carries the layout of its model (``schema``) and,
with virtual clients, the ids it hosts. The pipe, its waits, heartbeats and joining again are the
:class:`~openfl_api.link.Link` half of the client.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from openfl_api.address import Address
from openfl_api.errors import AdmissionError, ConfigurationError, PayloadError, TransportError
from openfl_api.ledger import Ledger
from openfl_api.payload import (
    MAX_HEADER_BYTES, FiniteScan, Schema, decode, dtype_name, encode, encode_header, on_cuda,
    parse_header, validate_meta,
)
from openfl_api.payload.config import check_config
from openfl_api.link import Link, header_or_empty
from openfl_api.reporting import Reporting
from openfl_api.state import SharedState
from openfl_api.step import Event, Transfer
from openfl_api.timeouts import Timeouts
from openfl_api.transport.base import Kind, Limits, Message, Pipe
from openfl_api.transport.heartbeat import Beat
from openfl_api.waiting import Helper

__all__ = ["Client", "check_upload_meta"]

class Client(Link, Reporting):
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
        self._io: Optional[Helper] = None  # runs the pipe's blocking waits, and the round trips of uploads
        self._pending: Optional[_Pending] = None  # an upload on its way, its answer not yet received
        self._backend_said = ""  # the status in the backend's last ping
        self._uploaded_from: Optional[int] = None  # the version the last upload was trained from
        self.downloaded: Optional[int] = None  # the version of the model downloaded last
        self.config: Dict[str, Any] = {}  # the round config served with the model downloaded last
        self.final: Optional[str] = None  # set when that model is the final one (served for evaluation only)
        self._sent_reports: Dict[str, Any] = {}  # the reports of that model, sent again to a backend joined again
        self._schema: Optional[List[List[Any]]] = None  # the model's layout, sent when registering
        #: The upload chain's frontend side (:class:`~openfl_api.transforms.frontend_side.FrontendSide`), or None.
        self.transforms: Any = None

    def download(self, state: SharedState, rank: int, nick_name: str) -> bool:
        """Load a global model whose version is >= the local one; False once it has ended."""
        if self.final is not None and not self.ended:
            self._end(self.final)  # the final model was served: there is no later one
        if self.ended:
            return False
        if not self._settle() or self.ended:
            return False
        transfer = Transfer(rank=rank, nick_name=nick_name, version=self.version)
        self._fire(Event.BEFORE_DOWNLOAD, transfer)
        asked = self.version

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
        # Only a loop that did not move its version since the upload asks for that version again;
        # an asynchronous backend or a discarded upload may serve it again to a loop that did.
        if asked == payload.version == self._uploaded_from and self.hosted is None:
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
        """Send the local state tagged with the local version; False once the federation ended.

        Over a pipe between processes the update is copied into the frontend's send buffer (the
        snapshot: later training cannot change what is sent) and sent on the I/O thread, and this
        returns at once: the backend's answer is awaited by the next call on the pipe
        (:meth:`_settle`), where ``after_upload`` fires and a refusal, the end or a broken pipe
        shows.
        """
        if self.final is not None and not self.ended:
            self._end(self.final)  # the model trained from was the final one: no update is taken
        if not self._settle() or self.ended:
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
        pipelined = not self._pipe.queues_sends
        out = None
        if pipelined:
            # The snapshot, in a buffer of the frontend's own; CUDA tensors reach the host through
            # page-locked memory.
            pinned = on_cuda(tensors.values())
            if self._tx is None or self._tx.numel() < schema.nbytes or self._tx.is_pinned() != pinned:
                self._tx = torch.zeros(schema.nbytes, dtype=torch.uint8, pin_memory=pinned)
            out = self._tx
        # In-process the pipe keeps what it is sent: the buffer is this upload's alone (owned).
        header, payload = encode(tensors, schema, kind="update", version=self.version, sender=nick_name,
                                 meta=meta, out=out)

        def request() -> Message:
            if self._registered:
                return Message(Kind.UPLOAD, header, payload, owned=not pipelined)
            # A backend joined again has not heard of this frontend yet.
            fields = parse_header(header)
            fields["meta"].update(self._registration(state))
            return Message(Kind.UPLOAD, encode_header(fields), payload, owned=not pipelined)

        self._uploaded_from = self.version
        pending = _Pending(request, transfer, len(header) + schema.nbytes,
                           f"the answer to the upload trained from version {self.version}")
        if pipelined:
            pending.started = self._start(request(), _ANSWER)
            self._pending = pending
            return True
        reply = self._exchange(request, _ANSWER, what=pending.what)
        if reply is None:
            return False
        self._answered(pending, reply)
        return True

    def _settle(self) -> bool:
        """Await the answer to the upload sent last, if it is still on its way; False once the
        federation ended. A broken pipe sends the upload again (after joining the backend again,
        as any request); a refusal raises here."""
        pending, self._pending = self._pending, None
        if pending is None:
            return True
        reply = self._exchange(pending.request, _ANSWER, what=pending.what, started=pending.started)
        if reply is None:
            return False
        self._answered(pending, reply)
        return True

    def _answered(self, pending: "_Pending", reply: Message) -> None:
        """The backend answered an upload: count it, tell the upload chain, fire ``after_upload``."""
        transfer = pending.transfer
        self._registered = True
        ack = header_or_empty(reply.header)
        transfer.accepted = bool(ack.get("accepted"))
        transfer.reason = str(ack.get("reason", ""))[:500]
        if self.transforms is not None:  # bytes on the wire; secure aggregation's unmask shares
            self.transforms.sent(pending.nbytes)
            failed = self.transforms.answered(transfer.accepted)
            if failed:  # the backend discards the uploads of a failed round
                transfer.accepted, transfer.reason = False, failed
        if transfer.accepted:
            self.ledger.add(self.backend_name, "uploads")
            self.log.debug(f"uploaded an update trained from version {transfer.version}")
        else:
            self.ledger.discard(self.backend_name, transfer.reason or "discarded")
            self.log.warning(f"the backend discarded this upload: {transfer.reason}")
        self._fire(Event.AFTER_UPLOAD, transfer)

    def finish(self, interrupted: bool = False) -> None:
        """Await the answer to an upload still on its way (a failure is logged), then say goodbye."""
        if not interrupted and self._pending is not None and self._pipe is not None:
            try:
                self._settle()
            except (TransportError, ConfigurationError, AdmissionError) as exc:
                self.log.warning(f"the last upload got no answer: {exc}")
        super().finish(interrupted)


_ANSWER = Limits(frozenset({Kind.ACK, Kind.END}), MAX_HEADER_BYTES, 0)  # what an upload is answered with


@dataclass
class _Pending:
    """An upload whose answer is awaited: how to send it again, its event's transfer, its bytes on
    the wire, the answer as the lines logged while it takes long name it, and its round trip."""

    request: Callable[[], Message]
    transfer: Transfer
    nbytes: int
    what: str
    started: "Optional[Future[Message]]" = None

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
