"""Where a version's time goes on the backend: waiting, receiving, aggregating.

A *round* is the time from the end of one aggregation (or the start of the serve loop) to the end
of the next, the same span ``bench/rounds.py`` and ``bench/simulation.py`` measure. It splits into

- **receiving**: wall time during which at least one upload was being received or handled (from
  its first payload byte, or from its turn for an in-process pipe, until its turn ended: checked,
  judged, answered and added), overlapping uploads counted once;
- **aggregating**: the aggregation itself (waiting for the last accumulation, the aggregator, the
  server optimizer);
- **waiting**: the rest: frontends training, downloads being served, idle turns.

The serve loop reports to a :class:`RoundClock`; the record and the report read each finished
round's :class:`RoundTiming`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["RoundTiming", "RoundClock"]


@dataclass(frozen=True)
class RoundTiming:
    """The time split of one round, in seconds; ``waiting + receiving + aggregating == round``."""

    round: float
    waiting: float
    receiving: float
    aggregating: float

    def as_dict(self) -> Dict[str, float]:
        return {"round": self.round, "waiting": self.waiting, "receiving": self.receiving,
                "aggregating": self.aggregating}


class RoundClock:
    """Collects the receiving and aggregating spans of each round (called under the serve loop's lock)."""

    def __init__(self) -> None:
        self._since: Optional[float] = None
        self._spans: List[Tuple[float, float]] = []
        #: the split of the last finished round, or None before the first aggregation
        self.last: Optional[RoundTiming] = None

    def start(self, now: Optional[float] = None) -> None:
        """The serve loop started: the first round starts now (unless it started already)."""
        if self._since is None:
            self._since = time.perf_counter() if now is None else now

    def receiving(self, start: float, end: float) -> None:
        """An upload was received and handled from ``start`` to ``end`` (``time.perf_counter``)."""
        self._spans.append((start, end))

    def aggregated(self, start: float, end: float) -> RoundTiming:
        """An aggregation ran from ``start`` to ``end``: close the round and start the next."""
        since = start if self._since is None else min(self._since, start)
        receiving = 0.0
        reach = since
        for first, last in sorted(self._spans):
            first, last = max(first, reach), min(last, start)
            if last > first:
                receiving += last - first
                reach = last
        aggregating = max(0.0, end - start)
        total = max(0.0, end - since)
        self.last = RoundTiming(round=total, waiting=max(0.0, total - receiving - aggregating), receiving=receiving,
                                aggregating=aggregating)
        self._since, self._spans = end, []
        return self.last
