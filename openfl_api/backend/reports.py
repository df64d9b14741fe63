"""The backend's side of evaluation reports: a ``REPORT`` request validated, answered, handed to the steps.

A frontend's ``api.evaluate`` sends the version it evaluated (at most the current one), its
number of samples and metrics, and with virtual clients whose report it is; the backend answers
with an ``ACK`` (``accepted`` false and the reason for a report that is not valid) and fires
``after_evaluate`` with a :class:`~openfl_api.step.Transfer` of it. A report carries no payload and
takes no turn from the accumulation of an upload.
"""

from __future__ import annotations

from openfl_api.backend.exchange import Exchange
from openfl_api.backend.worker import Worker
from openfl_api.errors import PayloadError
from openfl_api.payload import encode_header, parse_header, validate_meta
from openfl_api.step import Event, Transfer
from openfl_api.transport.base import Kind, Message

__all__ = ["take_report"]


def take_report(exchange: Exchange, worker: Worker, message: Message) -> None:
    """Take a frontend's evaluation of a global model: validate it, answer, fire ``after_evaluate``."""
    current = exchange.versions.version
    try:
        if message.payload is not None:
            raise PayloadError("an evaluation report carries no payload")
        header = parse_header(message.header)
        version = header.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= current:
            raise PayloadError(f"an evaluation report must name a version in [0, {current}], got {version!r}"[:200])
        meta = validate_meta(header)
        refused = exchange.register(worker, header)
        client = header.get("client", worker.clients[0] if worker.clients and not worker.hosts_many else None)
        if refused is None and (not isinstance(client, str) or client not in (worker.clients or ())):
            raise PayloadError(f"'client' must name a client this frontend hosts, got {str(client)[:70]!r}")
    except PayloadError as exc:
        exchange.log.warning(f"rejected the evaluation report of {worker.label}: {exc}")
        worker.reply(Message(Kind.ACK, encode_header({"accepted": False, "reason": f"invalid report: {exc}",
                                                      "version": current})))
        return
    if refused is not None:
        exchange.refuse(worker, *refused)
        return
    transfer = Transfer(rank=worker.peer.rank, nick_name=worker.peer.nick_name, version=version,
                        num_samples=meta["num_samples"], metrics=meta["metrics"], accepted=True,
                        staleness=current - version, client=client, nbytes=len(message.header))
    worker.reply(Message(Kind.ACK, encode_header({"accepted": True, "reason": "", "version": current})))
    exchange.log.debug(f"{worker.label} reported its evaluation of version {version}")
    exchange.server.fire(Event.AFTER_EVALUATE, transfer)
