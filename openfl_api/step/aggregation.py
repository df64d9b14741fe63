"""Steps that decide when to aggregate: ``AggregateCount``, ``AggregatePeriod``, ``Deadline``.

Each asks for the aggregation with ``api.aggregate()``, which the backend honours once every step
has seen the event at hand, and with ``checkpoint=`` saves every aggregated version.
"""

from __future__ import annotations

import math
import numbers
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

from openfl_api.errors import ConfigurationError
from openfl_api.step.base import BACKEND, Step, Transfer

__all__ = ["AggregateCount", "AggregatePeriod", "Deadline"]


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
