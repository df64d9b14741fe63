"""What the client-side helpers share: argument checks and per-client state that survives a retrain.

A client's state (SCAFFOLD's control variate, FedDyn's gradient) changes each time it trains. When
a backend is killed after accepting an upload and resumes from the checkpoint of the version
before, the client trains that version again and must start from the state it had *before* that
version, or the federation would not end with the uninterrupted weights. So a state remembers
the version it was made at and the value it started from::

    {"version": v, "value": [tensors after training v], "before": [tensors before training v]}
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, List, Mapping, Optional

import torch

from openfl_api.errors import ConfigurationError

__all__ = ["check_number", "check_version", "start_value", "next_state"]


def check_number(value: Any, what: str, low: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float; raises ConfigurationError unless it is a finite number ``>= low`` (``> low``
    with ``strict``)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (value <= low if strict else value < low)):
        raise ConfigurationError(f"{what} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def check_version(version: Any, what: str) -> int:
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 0:
        raise ConfigurationError(f"{what} must be the version trained from, an int >= 0 (api.version, or "
                                 f"client.version for virtual clients), got {version!r}")
    return int(version)


def start_value(state: Optional[Mapping[str, Any]], version: int, fresh: Callable[[], List[torch.Tensor]],
                what: str) -> List[torch.Tensor]:
    """The value a client starts training ``version`` from: ``fresh()`` without a state, the state's
    value when it was made at an older version, the value it started from when it was made at
    ``version`` itself (the version is trained again).

    Raises:
        ConfigurationError: ``state`` is not such a state, or was made at a later version.
    """
    if state is None:
        return fresh()
    if not isinstance(state, Mapping) or set(state) != {"version", "value", "before"}:
        raise ConfigurationError(f"{what} must be None or a state returned by finish(), a dict with keys "
                                 f"['before', 'value', 'version']; got {str(state)[:80]}")
    made = int(state["version"])
    if made < version:
        return [t.clone() for t in state["value"]]
    if made == version:
        return [t.clone() for t in state["before"]]
    raise ConfigurationError(f"{what} was made at version {made}, after the version {version} being trained; give "
                             "each client its own state, and the version it trains from")


def next_state(version: int, value: List[torch.Tensor], before: List[torch.Tensor]) -> dict:
    """The state after training ``version``: its new value and the value it started from."""
    return {"version": version, "value": [t.detach().clone() for t in value],
            "before": [t.detach().clone() for t in before]}
