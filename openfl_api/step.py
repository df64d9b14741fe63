"""Steps: small objects attached to one API that fire at a closed set of events.

A step overrides the methods named after the events it cares about. Steps fire in the order they
were attached, while the model is owned by their event (the backend's serve loop holding its lock,
on its own thread or, for an in-memory frontend's request, on that frontend's thread; or the
frontend's caller), so they never race. They act through the API (``api.aggregate()``, ``api.stop(reason)``,
``api.save_checkpoint(path)``) and through the :class:`Transfer` they are given
(``transfer.discard(reason)``), never through return values.

- ``at_loop(api)``: backend, every serve-loop iteration (each message handled, or every
  ``tick`` when idle). Never on a frontend.
- ``on_join(api, peer)`` / ``on_leave(api, peer)``: backend, a frontend was admitted / its pipe
  closed (goodbye, crash, timeout, address removed).
- ``before_download(api, transfer)``: backend, a download is about to be served; frontend,
  ``api.download()`` is about to ask.
- ``after_download(api, transfer)``: backend, the model was handed to the pipe; frontend, the
  model was loaded into the tensors.
- ``before_upload(api, transfer)``: backend, a valid upload arrived and the version rule has not
  decided yet (``transfer.discard(reason)`` drops it); frontend, ``api.upload()`` is about to send.
- ``after_upload(api, transfer)``: backend, the upload was accepted or discarded
  (``transfer.accepted``, ``transfer.reason``); frontend, the backend acknowledged it.
- ``after_aggregate(api)``: backend, a new global version exists. Never on a frontend.

Transfer events are called as ``method(api, transfer)``. After ``api.stop()`` the loop finishes the
event at hand (its remaining steps still fire), then no further event fires. A step that raises
stops the loop; ``run()`` raises :class:`~openfl_api.errors.StepError` naming the step, with the
step's exception chained.

A step fires on the roles in its ``roles`` attribute (built-ins that drive aggregation are
backend-only), so the same script can attach the same steps on every rank.

Writing a step::

    class LogAccuracy(ofl.Step):
        def after_upload(self, api, transfer):
            if transfer.accepted:
                print(api.version, transfer.rank, transfer.metrics.get("accuracy"))
"""

from __future__ import annotations

import contextvars
import difflib
import enum
import inspect
import math
import numbers
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Union

from openfl_api.errors import ConfigurationError

__all__ = [
    "Event",
    "Transfer",
    "Step",
    "StepAt",
    "AggregateCount",
    "AggregatePeriod",
    "StopAtVersion",
    "StopAtLoop",
    "Deadline",
    "ClientSampling",
    "ReportSilent",
    "current_scope",
]

BACKEND = "backend"
FRONTEND = "frontend"


class Event(str, enum.Enum):
    """The closed set of points where steps fire; the value is the method a step overrides."""

    AT_LOOP = "at_loop"  #: backend: each serve-loop iteration
    ON_JOIN = "on_join"  #: backend: a frontend was admitted
    ON_LEAVE = "on_leave"  #: backend: a frontend's pipe closed
    BEFORE_DOWNLOAD = "before_download"  #: a model is about to go to a frontend
    AFTER_DOWNLOAD = "after_download"  #: a model went to a frontend
    BEFORE_UPLOAD = "before_upload"  #: an update is about to be judged (backend) or sent (frontend)
    AFTER_UPLOAD = "after_upload"  #: an update was accepted or discarded
    AFTER_AGGREGATE = "after_aggregate"  #: backend: a new global version exists


_ARITY = {
    Event.AT_LOOP: 1,
    Event.AFTER_AGGREGATE: 1,
    Event.ON_JOIN: 2,
    Event.ON_LEAVE: 2,
    Event.BEFORE_DOWNLOAD: 2,
    Event.AFTER_DOWNLOAD: 2,
    Event.BEFORE_UPLOAD: 2,
    Event.AFTER_UPLOAD: 2,
}


@dataclass
class Transfer:
    """One download or upload, as steps see it.

    Attributes:
        rank: the frontend's rank.
        nick_name: the frontend's nick name.
        version: download: the version asked for, then the version served; upload: the version
            the update was trained from.
        num_samples: upload: samples behind the update.
        metrics: upload: the frontend's metrics.
        accepted: upload, after the decision: whether it went into the aggregate.
        reason: why an upload was discarded.
        staleness: upload: global version minus the version trained from.
        client: upload: the client id the update belongs to (a frontend hosts one client,
            ``"<group>/rank<N>"``, unless it hosts virtual clients).
        clients: download: the client ids of this frontend that take part in the served
            version; a sampling step narrows it.
        weight: upload: a factor on the update's aggregation weight (asynchronous mode
            multiplies in the staleness weight after ``before_upload``).
        held: download, backend: a step asked to hold it (see :meth:`hold`).
    """

    rank: int
    nick_name: str
    version: int
    num_samples: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)
    accepted: Optional[bool] = None
    reason: str = ""
    staleness: int = 0
    client: str = ""
    clients: List[str] = field(default_factory=list)
    weight: float = 1.0
    held: bool = False

    def discard(self, reason: str) -> None:
        """Drop this upload (from ``before_upload`` on the backend); it is counted as discarded."""
        self.accepted = False
        self.reason = reason

    def hold(self, reason: str) -> None:
        """Hold this download (from ``before_download`` on the backend) instead of serving it.

        A held download waits in the backend and is offered again (``before_download`` fires
        again) whenever the version, the connected clients or the expected uploads change.
        """
        self.held = True
        self.reason = reason


_scope: contextvars.ContextVar[Any] = contextvars.ContextVar("openfl_api_step_scope", default=None)


def current_scope() -> Any:
    """Return the API that steps built now attach to (inside ``with StepAt(api):``), or None."""
    return _scope.get()


class _AttachOnBuild(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        step = super().__call__(*args, **kwargs)
        api = _scope.get()
        if api is not None:
            api.register_step(step)
        return step


_EVENT_PREFIXES = ("at_", "on_", "before_", "after_")
#: Public methods of steps that are not events (helpers the backend or checkpoints call).
NOT_EVENTS = frozenset({"handlers", "state_dict", "load_state_dict", "uploads_needed"})


class Step(metaclass=_AttachOnBuild):
    """Base class of steps: override the methods of the events to handle.

    Every event is a method here that does nothing; a step overrides the ones it handles. A
    public method whose name looks like an event but is none (``after_uplaod``) is refused when
    the step is attached, with the closest event named: it would never fire.

    ``roles`` says where the step fires (``{"backend"}``, ``{"frontend"}`` or both); the default
    is both. Inside ``with StepAt(api):`` a step attaches to ``api`` when it is built.

    A backend step that triggers aggregation may also define ``uploads_needed(api) -> int | None``:
    the uploads it needs to aggregate the current version, which the backend's status line names
    when a version stalls.
    """

    roles: FrozenSet[str] = frozenset({BACKEND, FRONTEND})

    @property
    def name(self) -> str:
        """The name used in log lines and errors."""
        return type(self).__name__

    def at_loop(self, api: Any) -> None:
        """Backend: each turn of the serve loop (each request or event handled, or every ``tick``)."""

    def on_join(self, api: Any, peer: Any) -> None:
        """Backend: a frontend was admitted."""

    def on_leave(self, api: Any, peer: Any) -> None:
        """Backend: a frontend's pipe closed (goodbye, crash, timeout, address removed)."""

    def before_download(self, api: Any, transfer: "Transfer") -> None:
        """Backend: a download is about to be served (``transfer.hold(reason)`` holds it); frontend:
        ``api.download()`` is about to ask."""

    def after_download(self, api: Any, transfer: "Transfer") -> None:
        """Backend: the model was handed to the pipe; frontend: the model was loaded into the tensors."""

    def before_upload(self, api: Any, transfer: "Transfer") -> None:
        """Backend: a valid upload arrived, not yet judged (``transfer.discard(reason)`` drops it);
        frontend: ``api.upload()`` is about to send."""

    def after_upload(self, api: Any, transfer: "Transfer") -> None:
        """Backend: the upload was accepted or discarded (``transfer.accepted``, ``transfer.reason``);
        frontend: the backend answered."""

    def after_aggregate(self, api: Any) -> None:
        """Backend: a new global version exists."""

    def handlers(self) -> Dict[Event, Any]:
        """Return the bound methods this step overrides, checked against each event's signature.

        Raises:
            ConfigurationError: an overridden method cannot take the event's arguments, or a public
                method looks like an event but is none.
        """
        self._check_names()
        found: Dict[Event, Any] = {}
        for event in Event:
            if getattr(type(self), event.value) is getattr(Step, event.value):
                continue
            bound = getattr(self, event.value)
            try:
                inspect.signature(bound).bind(*([None] * _ARITY[event]))
            except TypeError:
                args = "(self, api)" if _ARITY[event] == 1 else "(self, api, transfer_or_peer)"
                raise ConfigurationError(
                    f"step {self.name}.{event.value} must accept {args}; "
                    f"its signature is {inspect.signature(bound)}"
                ) from None
            found[event] = bound
        return found

    def _check_names(self) -> None:
        events = [event.value for event in Event]
        for attribute in dir(type(self)):
            if attribute.startswith("_") or attribute in events or attribute in NOT_EVENTS:
                continue
            if not callable(getattr(type(self), attribute, None)):
                continue
            closest = difflib.get_close_matches(attribute, events, n=1, cutoff=0.75)
            if closest or attribute.startswith(_EVENT_PREFIXES):
                hint = f"did you mean {closest[0]}? " if closest else ""
                raise ConfigurationError(
                    f"step {self.name} has a method {attribute}() that is no event, so it would never fire: "
                    f"{hint}The events are {', '.join(events)}. Rename it, or start a helper's name with '_'"
                )

    def __repr__(self) -> str:
        return f"{self.name}()"


class StepAt:
    """Scope in which every step built attaches to ``api``: ``with StepAt(api): StopAtVersion(3)``."""

    def __init__(self, api: Any) -> None:
        if not hasattr(api, "register_step"):
            raise ConfigurationError(f"StepAt needs an openfl_api.API, got {type(api).__name__}")
        self.api = api
        self._token: Optional[contextvars.Token] = None

    def __enter__(self) -> Any:
        self._token = _scope.set(self.api)
        return self.api

    def __exit__(self, *exc_info: Any) -> None:
        _scope.reset(self._token)


def _check_checkpoint(checkpoint: Union[str, Path, None]) -> Optional[Path]:
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, Path)) or not str(checkpoint):
        raise ConfigurationError(f"checkpoint must be a path prefix or None, got {checkpoint!r}")
    return Path(checkpoint)


class _Aggregates(Step):
    roles = frozenset({BACKEND})

    def __init__(self, checkpoint: Union[str, Path, None]) -> None:
        self.checkpoint = _check_checkpoint(checkpoint)

    def after_aggregate(self, api: Any) -> None:
        if self.checkpoint is not None:
            api.save_checkpoint(f"{self.checkpoint}.{api.version}")


class AggregateCount(_Aggregates):
    """Aggregate once ``count`` uploads have been accepted for the current version.

    Args:
        count: accepted uploads per aggregation, >= 1.
        checkpoint: if given, each aggregated version ``v`` is saved to ``f"{checkpoint}.{v}"``.
    """

    def __init__(self, count: int, checkpoint: Union[str, Path, None] = None) -> None:
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigurationError(f"AggregateCount(count=...) must be an integer >= 1, got {count!r}")
        super().__init__(checkpoint)
        self.count = count

    def after_upload(self, api: Any, transfer: Transfer) -> None:
        if transfer.accepted and api.accepted >= self.count:
            api.aggregate()

    def uploads_needed(self, api: Any) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"AggregateCount(count={self.count})"


class AggregatePeriod(_Aggregates):
    """Aggregate every ``period`` if at least one upload was accepted since the last aggregation.

    Args:
        period: time between aggregations, a positive ``datetime.timedelta``.
        checkpoint: if given, each aggregated version ``v`` is saved to ``f"{checkpoint}.{v}"``.
    """

    def __init__(self, period: timedelta, checkpoint: Union[str, Path, None] = None) -> None:
        if not isinstance(period, timedelta) or period <= timedelta(0):
            raise ConfigurationError(
                f"AggregatePeriod(period=...) must be a positive datetime.timedelta, got {period!r}; "
                "write period=timedelta(seconds=30)"
            )
        super().__init__(checkpoint)
        self.period = period
        self._since = time.monotonic()

    def at_loop(self, api: Any) -> None:
        if time.monotonic() - self._since >= self.period.total_seconds() and api.accepted > 0:
            api.aggregate()

    def after_aggregate(self, api: Any) -> None:
        self._since = time.monotonic()
        super().after_aggregate(api)

    def __repr__(self) -> str:
        return f"AggregatePeriod(period={self.period})"


class StopAtVersion(Step):
    """Stop the federation once the global version reaches ``max_version``."""

    roles = frozenset({BACKEND})

    def __init__(self, max_version: int) -> None:
        if not isinstance(max_version, int) or isinstance(max_version, bool) or max_version < 1:
            raise ConfigurationError(f"StopAtVersion(max_version=...) must be an integer >= 1, got {max_version!r}")
        self.max_version = max_version

    def _check(self, api: Any) -> None:
        if api.version >= self.max_version:
            api.stop(f"version {api.version} reached max_version={self.max_version}")

    def at_loop(self, api: Any) -> None:
        self._check(api)

    def after_aggregate(self, api: Any) -> None:
        self._check(api)

    def __repr__(self) -> str:
        return f"StopAtVersion(max_version={self.max_version})"


class StopAtLoop(Step):
    """Stop the federation after ``max_loop`` serve-loop iterations."""

    roles = frozenset({BACKEND})

    def __init__(self, max_loop: int) -> None:
        if not isinstance(max_loop, int) or isinstance(max_loop, bool) or max_loop < 1:
            raise ConfigurationError(f"StopAtLoop(max_loop=...) must be an integer >= 1, got {max_loop!r}")
        self.max_loop = max_loop

    def at_loop(self, api: Any) -> None:
        if api.loop_count >= self.max_loop:
            api.stop(f"loop {api.loop_count} reached max_loop={self.max_loop}")

    def __repr__(self) -> str:
        return f"StopAtLoop(max_loop={self.max_loop})"


class Deadline(_Aggregates):
    """Aggregate what has arrived once ``after`` has passed in a version, if a quorum has.

    The clock starts when a version starts (the serve loop's start, then each aggregation). When
    it runs out with fewer than the quorum of accepted uploads, the step waits for the quorum
    and logs once that it does; uploads of stragglers that arrive after the aggregation are
    stale and discarded (synchronous mode).

    Args:
        after: the time a version may take, a positive ``datetime.timedelta``.
        quorum: accepted uploads needed: an int >= 1, or a fraction in ``(0, 1]`` of the
            clients the version expects (``api.expected``, set by :class:`ClientSampling`), else
            of the connected clients.
        checkpoint: if given, each aggregated version ``v`` is saved to ``f"{checkpoint}.{v}"``.
    """

    def __init__(self, after: timedelta, quorum: Union[int, float] = 1, checkpoint: Union[str, Path, None] = None) -> None:
        if not isinstance(after, timedelta) or after <= timedelta(0):
            raise ConfigurationError(
                f"Deadline(after=...) must be a positive datetime.timedelta, got {after!r}; write after=timedelta(seconds=30)"
            )
        if isinstance(quorum, bool) or not isinstance(quorum, numbers.Real) or (
            isinstance(quorum, numbers.Integral) and quorum < 1
        ) or (not isinstance(quorum, numbers.Integral) and not 0 < quorum <= 1):
            raise ConfigurationError(
                f"Deadline(quorum=...) must be an int >= 1 or a fraction in (0, 1], got {quorum!r}"
            )
        super().__init__(checkpoint)
        self.after = after
        self.quorum = quorum
        self._since = time.monotonic()
        self._warned = -1

    def needed(self, api: Any) -> int:
        """The accepted uploads this version needs before the deadline may aggregate it."""
        if isinstance(self.quorum, numbers.Integral):
            return int(self.quorum)
        expected = api.expected
        participants = len(expected) if expected is not None else len(api.clients)
        return max(1, math.ceil(self.quorum * participants))

    def at_loop(self, api: Any) -> None:
        if time.monotonic() - self._since < self.after.total_seconds():
            return
        needed = self.needed(api)
        if api.accepted >= needed:
            api.log.info(f"deadline of version {api.version} passed: aggregating {api.accepted} uploads (quorum {needed})")
            api.aggregate()
        elif self._warned != api.version:
            self._warned = api.version
            api.log.warning(f"deadline of version {api.version} passed with {api.accepted} of the {needed} uploads "
                            "the quorum needs; waiting for the quorum")

    def after_aggregate(self, api: Any) -> None:
        self._since = time.monotonic()
        super().after_aggregate(api)

    def uploads_needed(self, api: Any) -> int:
        return self.needed(api)

    def __repr__(self) -> str:
        return f"Deadline(after={self.after}, quorum={self.quorum})"


class ClientSampling(Step):
    """Choose the clients that take part in each version; the others wait.

    For each version a seeded generator draws from the connected clients (sorted, so the draw
    depends only on the seed, the version and who is connected), once at least ``min_clients``
    have connected. Downloads of clients not drawn are held until a version draws them; their
    uploads are discarded. The draw is declared with ``api.expect(...)``, so the drawn clients'
    uploads are accumulated in a fixed order whatever order they arrive in.

    Args:
        fraction: the share of connected clients per version, in ``(0, 1]`` (at least one).
        count: or the number of clients per version, >= 1 (all of them if fewer are connected).
        seed: the seed of the draws.
        min_clients: clients that must be connected before the first draw of a version;
            default ``count``, or 1 with ``fraction``.
    """

    roles = frozenset({BACKEND})

    def __init__(self, fraction: Optional[float] = None, count: Optional[int] = None, seed: int = 0,
                 min_clients: Optional[int] = None) -> None:
        if (fraction is None) == (count is None):
            raise ConfigurationError("ClientSampling needs exactly one of fraction=... or count=...")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
                                     or not 0 < fraction <= 1):
            raise ConfigurationError(f"ClientSampling(fraction=...) must be in (0, 1], got {fraction!r}")
        for label, value in (("count", count), ("min_clients", min_clients)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"ClientSampling({label}=...) must be an int >= 1, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"ClientSampling(seed=...) must be an int >= 0, got {seed!r}")
        self.fraction, self.count, self.seed = fraction, count, seed
        self.min_clients = min_clients if min_clients is not None else (count or 1)
        self._drawn: Optional[int] = None
        self._chosen: frozenset = frozenset()

    def draw(self, clients: List[str], version: int) -> List[str]:
        """The clients drawn for ``version`` out of ``clients`` (given in sorted order)."""
        import numpy as np

        k = self.count if self.count is not None else max(1, round(self.fraction * len(clients)))
        k = min(k, len(clients))
        rng = np.random.default_rng([self.seed, version])
        picked = np.sort(rng.choice(len(clients), size=k, replace=False))
        return [clients[i] for i in picked]

    def _current(self, api: Any) -> bool:
        if self._drawn == api.version:
            return True
        clients = api.clients
        if len(clients) < self.min_clients:
            return False
        chosen = self.draw(clients, api.version)
        api.expect(chosen)
        self._drawn, self._chosen = api.version, frozenset(chosen)
        api.log.info(f"version {api.version}: sampled {len(chosen)} of {len(clients)} clients")
        return True

    def before_download(self, api: Any, transfer: Transfer) -> None:
        if not self._current(api):
            transfer.hold(f"waiting for {self.min_clients} clients to sample from ({len(api.clients)} connected)")
            return
        chosen = [c for c in transfer.clients if c in self._chosen]
        if chosen:
            transfer.clients = chosen
        else:
            transfer.hold(f"not sampled for version {api.version}")

    def before_upload(self, api: Any, transfer: Transfer) -> None:
        if self._drawn == api.version and transfer.version == api.version and transfer.client not in self._chosen:
            transfer.discard(f"not sampled: client {transfer.client} was not drawn for version {api.version}")

    def __repr__(self) -> str:
        amount = f"fraction={self.fraction}" if self.fraction is not None else f"count={self.count}"
        return f"ClientSampling({amount}, seed={self.seed})"


class ReportSilent(Step):
    """After each aggregation, log the connected clients with no accepted upload for ``versions`` versions.

    A client's upload for version ``v`` counts for ``v``; a client that joined during version
    ``v`` counts as having uploaded for ``v - 1``. ``silent`` holds the last report: client id ->
    versions missed in a row.
    """

    roles = frozenset({BACKEND})

    def __init__(self, versions: int) -> None:
        if isinstance(versions, bool) or not isinstance(versions, int) or versions < 1:
            raise ConfigurationError(f"ReportSilent(versions=...) must be an int >= 1, got {versions!r}")
        self.versions = versions
        self._last: Dict[str, int] = {}
        self.silent: Dict[str, int] = {}

    def after_upload(self, api: Any, transfer: Transfer) -> None:
        if transfer.accepted:
            self._last[transfer.client] = transfer.version

    def after_aggregate(self, api: Any) -> None:
        for client in api.clients:
            self._last.setdefault(client, api.version - 1)
        missed = {c: api.version - self._last[c] - 1 for c in api.clients}
        self.silent = {c: n for c, n in missed.items() if n >= self.versions}
        if self.silent:
            listed = ", ".join(f"{c} ({n})" for c, n in list(self.silent.items())[:20])
            api.log.warning(f"version {api.version}: {len(self.silent)} clients have not uploaded for "
                            f"{self.versions} or more versions: {listed}")

    def state_dict(self) -> Dict[str, Any]:
        """The last accepted upload version per client, for an exact resume."""
        return {"last": dict(self._last)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._last = {str(k): int(v) for k, v in state["last"].items()}

    def __repr__(self) -> str:
        return f"ReportSilent(versions={self.versions})"
