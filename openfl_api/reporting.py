"""A frontend's evaluation reports: ``api.evaluate`` sends one per evaluated model and client.

A report is one request (``REPORT``, a header only: the version evaluated, the number of samples,
the metrics and, with virtual clients, whose it is) answered with an ``ACK``; the backend fires
``after_evaluate`` with it (:mod:`openfl_api.evaluation` aggregates them, :mod:`openfl_api.record`
writes them). :class:`Reporting` is the part of :class:`~openfl_api.frontend.Client` that sends
them.

A backend joined again after it went away may have lost reports it acknowledged: one restarted
from a checkpoint resumes from a state written before them. So after joining again, before it
repeats the request at hand, a frontend sends the reports of the model it downloaded last once
more. The backend takes a report of a version whose evaluation it has aggregated as a late one
(recorded, not counted again), and refuses one of a version it has not reached (a checkpoint
older than that model).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from openfl_api.errors import ConfigurationError, PayloadError, TransportError
from openfl_api.payload import MAX_HEADER_BYTES, encode_header, parse_header
from openfl_api.state import SharedState
from openfl_api.step import Event, Transfer
from openfl_api.transport.base import Kind, Limits, Message
from openfl_api.waiting import logged

__all__ = ["Reporting"]


class Reporting:
    """The part of :class:`~openfl_api.frontend.Client` that reports evaluations.

    Expects ``ended``, ``final``, ``downloaded``, ``config``, ``hosted``, ``timeouts``,
    ``_registered``, ``_sent_reports`` (an empty dict), ``log`` and the methods ``_exchange``,
    ``_round_trip``, ``_registration``, ``_settle``, ``_end`` and ``_fire`` on the object.
    """

    ended: bool
    final: Optional[str]
    downloaded: Optional[int]
    config: Dict[str, Any]
    hosted: Optional[List[str]]
    timeouts: Any
    _registered: bool
    #: client ("" for this frontend) -> (the version it reported, the request that sent the report)
    _sent_reports: Dict[str, Tuple[int, Callable[[], Message]]]
    log: Any
    _exchange: Callable[..., Optional[Message]]
    _round_trip: Callable[[Message, Limits], Message]
    _registration: Callable[[SharedState], Dict[str, Any]]
    _settle: Callable[[], bool]
    _end: Callable[..., None]
    _fire: Callable[..., None]

    def report(self, state: SharedState, rank: int, nick_name: str, num_samples: int, metrics: Mapping[str, float],
               client: Optional[str] = None) -> bool:
        """Send this frontend's evaluation of the model downloaded last; False once the federation ended.

        After the final model (served for evaluation only) each hosted client may still report
        it; the frontend's calls then end.
        """
        self._settle()  # the answer to an upload on its way comes first
        if self.ended and self.final is None:
            return False
        if self.downloaded is None:
            raise ConfigurationError("api.evaluate() evaluates the downloaded global model: call it after "
                                     "api.download() has returned True")
        client = self._reporting_client(client)
        version = self.downloaded
        transfer = Transfer(rank=rank, nick_name=nick_name, version=version, num_samples=num_samples,
                            metrics=dict(metrics), client=client or "", config=dict(self.config))
        fields: Dict[str, Any] = {"version": version, "num_samples": num_samples, "metrics": dict(metrics)}
        if client:
            fields["client"] = client

        def request() -> Message:
            sent = dict(fields)
            if not self._registered:
                sent.update(self._registration(state))
            return Message(Kind.REPORT, encode_header(sent))

        reply = self._exchange(request, _ANSWER, what=f"the answer to the evaluation of version {version}")
        if reply is None:
            return False
        self._registered = True
        self._sent_reports = {c: sent for c, sent in self._sent_reports.items() if sent[0] == version}
        self._sent_reports[client or ""] = (version, request)
        try:
            ack = parse_header(reply.header)
        except PayloadError:
            ack = {}
        transfer.accepted = bool(ack.get("accepted"))
        transfer.reason = str(ack.get("reason", ""))[:500]
        if not transfer.accepted:
            self.log.warning(f"the backend rejected this evaluation report: {transfer.reason}")
        if self.final is not None and not self.ended:
            self._end(self.final)
        self._fire(Event.AFTER_EVALUATE, transfer)
        return True

    def _report_again(self, repeating: Callable[[], Message]) -> None:
        """After joining a backend again: send the reports of the model downloaded last once more,
        before ``repeating`` (the request at hand) is sent again. A broken pipe or an end leaves
        the rest to the repeated request."""
        for client, (version, request) in list(self._sent_reports.items()):
            if version != self.downloaded or request is repeating:
                continue
            whose = f" of client {client}" if client else ""
            try:
                with logged(self.log, self.timeouts.status,
                            lambda: f"the answer to the evaluation{whose} of version {version}, sent again"):
                    reply = self._round_trip(request(), _ANSWER)
            except TransportError as exc:
                self.log.debug(f"sending the evaluation{whose} of version {version} again failed: {exc}")
                return
            if reply.kind is not Kind.ACK:
                return
            self._registered = True
            try:
                accepted = bool(parse_header(reply.header).get("accepted"))
            except PayloadError:
                accepted = False
            self.log.info(f"sent the evaluation{whose} of version {version} once more after joining the backend "
                          f"again{'' if accepted else ', which refused it (it resumed from an older version)'}")

    def _reporting_client(self, client: Optional[str]) -> Optional[str]:
        if self.hosted is None:
            if client is not None:
                raise ConfigurationError("evaluate(client=...) needs API(clients=[...]) on this frontend")
            return None
        if client is None:
            if len(self.hosted) != 1:
                raise ConfigurationError("this frontend hosts several clients: say whose evaluation this is, "
                                         "evaluate(..., client=...)")
            return self.hosted[0]
        if client not in self.hosted:
            raise ConfigurationError(f"evaluate(client={client!r}): this frontend hosts no such client")
        return client


_ANSWER = Limits(frozenset({Kind.ACK, Kind.END}), MAX_HEADER_BYTES, 0)  # what a report is answered with
