"""Steps: small objects attached to one API that fire at a closed set of events.

A step overrides the methods named after the events it cares about. Steps fire in the order they
were attached, on the thread that owns the model (the backend's serve loop, or the frontend's
caller), so they never race. They act through the API (``api.aggregate()``, ``api.stop(reason)``,
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
import enum
import inspect
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, FrozenSet, Optional, Union

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
    """

    rank: int
    nick_name: str
    version: int
    num_samples: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)
    accepted: Optional[bool] = None
    reason: str = ""
    staleness: int = 0

    def discard(self, reason: str) -> None:
        """Drop this upload (from ``before_upload`` on the backend); it is counted as discarded."""
        self.accepted = False
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


class Step(metaclass=_AttachOnBuild):
    """Base class of steps: override the methods of the events to handle.

    ``roles`` says where the step fires (``{"backend"}``, ``{"frontend"}`` or both); the default
    is both. Inside ``with StepAt(api):`` a step attaches to ``api`` when it is built.
    """

    roles: FrozenSet[str] = frozenset({BACKEND, FRONTEND})

    @property
    def name(self) -> str:
        """The name used in log lines and errors."""
        return type(self).__name__

    def handlers(self) -> Dict[Event, Any]:
        """Return the bound methods this step overrides, checked against each event's signature.

        Raises:
            ConfigurationError: an overridden method cannot take the event's arguments.
        """
        found: Dict[Event, Any] = {}
        for event in Event:
            method = getattr(type(self), event.value, None)
            if method is None or method is getattr(Step, event.value, None):
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

    def _aggregate(self, api: Any) -> None:
        if api.aggregate() and self.checkpoint is not None:
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
        if transfer.accepted and api.received >= self.count:
            self._aggregate(api)

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
        if time.monotonic() - self._since >= self.period.total_seconds() and api.received > 0:
            self._aggregate(api)

    def after_aggregate(self, api: Any) -> None:
        self._since = time.monotonic()

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
