"""Asynchronous mode: serve the newest model at once, weight updates by their staleness.

``API(asynchronous=Asynchronous(alpha=0.6, staleness=Polynomial(0.5), max_staleness=16))`` turns
the same user loop asynchronous (DESIGN.md §2):

- ``download()`` is answered at once with the newest global model, whatever version was asked;
- an upload trained from version ``tau`` arriving at global version ``t`` has staleness
  ``d = t - tau``; it is accepted while ``d <= max_staleness`` and added to the aggregator with
  weight ``staleness(d)`` (times its number of samples, for FedAvg);
- at each aggregation (``AggregateCount(k)``: every ``k`` accepted updates) the aggregate ``a`` is
  mixed into the global model ``x``: ``x <- (1 - alpha_t) x + alpha_t a`` with
  ``alpha_t = alpha * mean staleness weight`` of the buffered updates.

With ``k = 1`` this is FedAsync (Xie et al., 2019): ``x <- (1 - alpha s(t - tau)) x + alpha s(t - tau) x_new``.
With ``k > 1`` it is buffered asynchronous aggregation in the manner of FedBuff (Nguyen et al.,
2022): ``k`` updates are averaged, each weighted by its staleness, before one server step.
FedBuff proper averages client *deltas* and applies them with a server learning rate; here clients
upload models (the contract of DESIGN.md §4) and the average of models is mixed with ``alpha``.
A ``server_optimizer`` given to ``set_aggregator_and_optimizer`` then sees the mixed model.

Start policy: the backend serves no model until ``min_frontends`` frontends have asked for one
(by default every frontend its addresses' ``world_size`` allows), so frontends that start a little
later than the first do not miss the versions the first one would otherwise race through. While
it waits, the status line names who is missing.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

from openfl_api.aggregate.staleness import Polynomial, Staleness
from openfl_api.errors import ConfigurationError

__all__ = ["Asynchronous"]


@dataclass(frozen=True)
class Asynchronous:
    """The settings of asynchronous mode.

    Attributes:
        alpha: the mixing weight in ``(0, 1]``; FedAsync's experiments use 0.4-0.9.
        staleness: a callable ``d -> weight in (0, 1]``:
            :class:`~openfl_api.aggregate.Constant`, :class:`~openfl_api.aggregate.Polynomial`
            (default, ``a = 0.5``) or :class:`~openfl_api.aggregate.Hinge`.
        max_staleness: the largest accepted staleness; staler updates are discarded and counted.
            None accepts any staleness.
        min_frontends: frontends that must have asked for a model before the first one is served;
            None waits for every frontend the served addresses' ``world_size`` allows.
    """

    alpha: float = 0.6
    staleness: Staleness = field(default_factory=Polynomial)
    max_staleness: Optional[int] = 16
    min_frontends: Optional[int] = None

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or not 0 < alpha <= 1:
            raise ConfigurationError(f"Asynchronous(alpha=...) must be a number in (0, 1]; got {alpha!r}")
        if not callable(self.staleness):
            raise ConfigurationError(
                f"Asynchronous(staleness=...) must be callable d -> weight, e.g. aggregate.Polynomial(0.5); "
                f"got {self.staleness!r}"
            )
        bound = self.max_staleness
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, numbers.Integral) or bound < 0):
            raise ConfigurationError(f"Asynchronous(max_staleness=...) must be an int >= 0 or None; got {bound!r}")
        least = self.min_frontends
        if least is not None and (isinstance(least, bool) or not isinstance(least, numbers.Integral) or least < 1):
            raise ConfigurationError(f"Asynchronous(min_frontends=...) must be an int >= 1 or None; got {least!r}")

    def weight(self, d: int) -> float:
        """The staleness weight of an update ``d`` versions old, checked to lie in ``(0, 1]``."""
        value = self.staleness(d)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
            raise ConfigurationError(f"staleness function {self.staleness!r} returned {value!r} for d={d}; it must be in (0, 1]")
        return float(value)
