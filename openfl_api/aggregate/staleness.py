"""Staleness functions of asynchronous FL: how much an update trained from an old version counts.

FedAsync (Xie et al., 2019, "Asynchronous Federated Optimization", §5) mixes an update trained
from version ``tau`` into the global model of version ``t`` with weight ``alpha * s(t - tau)``,
where ``s`` is one of:

- constant: ``s(d) = 1``;
- polynomial: ``s(d) = (d + 1) ** -a``, ``a > 0``;
- hinge: ``s(d) = 1`` if ``d <= b``, else ``1 / (a * (d - b) + 1)``, ``a > 0``, ``b >= 0``.

Each is a pure function of the staleness ``d >= 0`` plus a small callable object that carries
its parameters (so a configuration can be printed and checkpointed). Values are in ``(0, 1]``.
"""

from __future__ import annotations

import math
import numbers

from openfl_api.errors import ConfigurationError

__all__ = ["constant", "polynomial", "hinge", "Staleness", "Constant", "Polynomial", "Hinge"]


def _check_staleness(d: int) -> int:
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
        raise ConfigurationError(f"staleness must be an int >= 0 (global version minus trained-from version); got {d!r}")
    return int(d)


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{what} must be a finite number > 0; got {value!r}")
    return float(value)


def constant(d: int) -> float:
    """``s(d) = 1``: every accepted update counts the same whatever its staleness."""
    _check_staleness(d)
    return 1.0


def polynomial(d: int, a: float = 0.5) -> float:
    """``s(d) = (d + 1) ** -a``: decays smoothly; FedAsync's default uses ``a = 0.5``."""
    return float((_check_staleness(d) + 1) ** -_positive(a, "polynomial staleness a"))


def hinge(d: int, a: float = 10.0, b: int = 4) -> float:
    """``s(d) = 1`` up to ``b`` versions behind, then ``1 / (a * (d - b) + 1)``."""
    d = _check_staleness(d)
    a = _positive(a, "hinge staleness a")
    if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
        raise ConfigurationError(f"hinge staleness b must be an int >= 0; got {b!r}")
    return 1.0 if d <= b else 1.0 / (a * (d - b) + 1.0)


class Staleness:
    """A staleness function with its parameters: ``weight = staleness(d)``."""

    def __call__(self, d: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Constant(Staleness):
    """:func:`constant`."""

    def __call__(self, d: int) -> float:
        return constant(d)


class Polynomial(Staleness):
    """:func:`polynomial` with exponent ``a > 0``."""

    def __init__(self, a: float = 0.5) -> None:
        self.a = _positive(a, "Polynomial(a=...)")

    def __call__(self, d: int) -> float:
        return polynomial(d, self.a)


class Hinge(Staleness):
    """:func:`hinge` with slope ``a > 0`` and threshold ``b >= 0`` versions."""

    def __init__(self, a: float = 10.0, b: int = 4) -> None:
        self.a = _positive(a, "Hinge(a=...)")
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
            raise ConfigurationError(f"Hinge(b=...) must be an int >= 0; got {b!r}")
        self.b = int(b)

    def __call__(self, d: int) -> float:
        return hinge(d, self.a, self.b)
