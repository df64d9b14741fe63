"""The base class of upload transforms and the stages a chain runs them in."""

from __future__ import annotations

import enum
import math
import numbers
from typing import Any, Dict

from openfl_api.errors import ConfigurationError

__all__ = ["Stage", "Transform", "check_number", "check_int"]


class Stage(enum.IntEnum):
    """Where in the chain a transform acts; a chain lists its transforms in this order."""

    CLIP = 0  #: frontend: bound the update's L2 norm (Clip, AdaptiveClip)
    COMPRESS = 1  #: frontend encodes fewer bytes, backend decodes (TopK, QSGD, Cast)
    MASK = 2  #: frontend masks, backend learns only the sum (SecAgg)
    NOISE = 3  #: backend: Gaussian noise on the aggregate (GaussianNoise)


class Transform:
    """One link of an upload chain (see :class:`~openfl_api.transforms.Chain`).

    Subclasses set :attr:`stage` and return their parameters from :meth:`config`; the chain
    compares ``describe()`` of both sides when a frontend joins.
    """

    stage: Stage

    @property
    def name(self) -> str:
        """The name used in descriptions and messages."""
        return type(self).__name__

    def config(self) -> Dict[str, Any]:
        """The parameters that must be the same on every rank (JSON values)."""
        return {}

    def describe(self) -> Dict[str, Any]:
        """``{"name": ..., **config}``: what the payload header and the join check carry."""
        return {"name": self.name, **self.config()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"


def check_number(owner: str, label: str, value: Any, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Validate a real number in a range; return it as float."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        raise ConfigurationError(f"{owner}({label}=...) must be a finite number in {lo}{low}, {high}{hi}; got {value!r}")
    return float(value)


def check_int(owner: str, label: str, value: Any, low: int, high: float = math.inf) -> int:
    """Validate an int in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ConfigurationError(f"{owner}({label}=...) must be an int {bound}; got {value!r}")
    return int(value)
