"""The step base class, the closed set of events, the transfer steps see, and ``StepAt``."""

from __future__ import annotations

import contextvars
import difflib
import enum
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional

from openfl_api.errors import ConfigurationError

__all__ = ["BACKEND", "FRONTEND", "Event", "Transfer", "Step", "StepAt", "current_scope", "NOT_EVENTS"]

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
    AFTER_EVALUATE = "after_evaluate"  #: a frontend's evaluation of a global model was reported


_ARITY = {
    Event.AT_LOOP: 1,
    Event.AFTER_AGGREGATE: 1,
    Event.ON_JOIN: 2,
    Event.ON_LEAVE: 2,
    Event.BEFORE_DOWNLOAD: 2,
    Event.AFTER_DOWNLOAD: 2,
    Event.BEFORE_UPLOAD: 2,
    Event.AFTER_UPLOAD: 2,
    Event.AFTER_EVALUATE: 2,
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
        config: download: the round config served in the model's header, a JSON object
            (backend steps set entries in ``before_download``; a frontend reads it as
            ``api.config``). Keys in use: ``"evaluate"`` (bool: evaluate this version) and
            ``"final"`` (str: this is the final model, served for evaluation only; the reason the
            federation stops).
        nbytes: backend: the bytes of the message (header and payload) of this transfer.
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
    config: Dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0

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

    A backend step whose ``defers_stop`` is True keeps a stop asked with ``api.stop(reason)``
    pending (``api.stopping`` holds the reason, and the loop goes on) until it calls
    ``api.release_stop(self)``: ``FederatedEvaluation`` evaluates the final model that way.
    """

    roles: FrozenSet[str] = frozenset({BACKEND, FRONTEND})
    defers_stop: bool = False

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

    def after_evaluate(self, api: Any, transfer: "Transfer") -> None:
        """Backend: a frontend reported its evaluation of version ``transfer.version``
        (``transfer.num_samples``, ``transfer.metrics``, ``transfer.client``); frontend:
        ``api.evaluate()`` reported and the backend answered."""

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
                hint = f"Did you mean {closest[0]}? " if closest else ""
                raise ConfigurationError(
                    f"step {self.name} has a method {attribute}() that is no event, so it would never fire. "
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
