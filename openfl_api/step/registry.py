"""The steps attached to one API, in attach order, and how an event fires them."""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Optional, Tuple

from torch.utils.hooks import RemovableHandle

from openfl_api.errors import ConfigurationError, StepError
from openfl_api.step.base import BACKEND, Event, Step

__all__ = ["Steps"]


class Steps:
    """The steps attached to one API.

    Args:
        owner: the API the steps act through (passed to every handler).
    """

    def __init__(self, owner: Any) -> None:
        self._owner = owner
        self._steps: "collections.OrderedDict[int, Step]" = collections.OrderedDict()
        self._handlers: Dict[int, Dict[Event, Any]] = {}
        self._key: Tuple[int, Optional[int]] = (0, None)
        self._cache: Dict[Event, List[Tuple[Step, Any]]] = {}

    def attach(self, step: Step) -> RemovableHandle:
        """Attach ``step`` after the others; ``remove()`` on the handle detaches it.

        Raises:
            ConfigurationError: not a :class:`Step`, already attached, a handler's signature does
                not fit its event, or a method looks like an event but is none.
        """
        if not isinstance(step, Step):
            raise ConfigurationError(f"register_step needs an openfl_api.Step, got {type(step).__name__}")
        if any(attached is step for attached in self._steps.values()):
            raise ConfigurationError(f"step {step!r} is attached to this API already")
        handlers = step.handlers()
        handle = RemovableHandle(self._steps)
        self._steps[handle.id] = step
        self._handlers[handle.id] = handlers
        return handle

    def __iter__(self):
        return iter(list(self._steps.values()))

    def fire(self, role: str, event: Event, *args: Any) -> None:
        """Call the handlers of ``event`` of the steps that fire on ``role``, in attach order.

        Raises:
            StepError: a handler raised; the owner was asked to stop, naming the step.
        """
        for step, handler in self._attached(event):
            if role not in step.roles:
                continue
            try:
                handler(self._owner, *args)
            except StepError:
                raise
            except Exception as exc:
                self._owner.stop(f"step {step.name} raised at {event.value}", at_once=True)
                raise StepError(step.name, event.value, f"{type(exc).__name__}: {exc}") from exc

    def _attached(self, event: Event) -> List[Tuple[Step, Any]]:
        """``(step, handler)`` of the attached steps that handle ``event``, in attach order.

        Cached per event until a step is attached or removed: handle ids only grow, so the count
        and the newest id change whenever the attached steps do.
        """
        key = (len(self._steps), next(reversed(self._steps), None))
        if key != self._key:
            self._key, self._cache = key, {}
        cached = self._cache.get(event)
        if cached is None:
            cached = self._cache[event] = [
                (step, self._handlers[k][event]) for k, step in self._steps.items() if event in self._handlers.get(k, {})
            ]
        return cached

    def uploads_needed(self) -> Optional[Tuple[int, str]]:
        """The most uploads an attached backend step needs to aggregate the current version, and
        which step (its ``uploads_needed(api)``); None when no step says."""
        best: Optional[Tuple[int, str]] = None
        for step in self._steps.values():
            method = getattr(step, "uploads_needed", None)
            if BACKEND not in step.roles or not callable(method):
                continue
            needed = method(self._owner)
            if needed is not None and (best is None or needed > best[0]):
                best = (int(needed), repr(step))
        return best
