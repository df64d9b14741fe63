"""The transfer ledger behind ``finish()``'s Pending / Finished / Discard table.

Per peer it counts requests held waiting (Pending), transfers completed (Finished: models served
or updates accepted) and updates discarded (Discard: stale, invalid, or dropped by a step), plus
the reasons for discards, refused joins and messages refused by the protected wire.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Dict, List

from prettytable import PrettyTable

__all__ = ["Ledger"]


class Ledger:
    """Counts transfers per peer; safe to update from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: Dict[str, Counter] = defaultdict(Counter)
        self.discard_reasons: Counter = Counter()
        self.refused: List[str] = []
        self.wire: Counter = Counter()  # messages the protected wire refused, by reason

    def add(self, peer: str, column: str, amount: int = 1) -> None:
        """Add ``amount`` to ``column`` ("pending", "downloads", "uploads", "discard") of ``peer``."""
        with self._lock:
            self._rows[peer][column] += amount

    def discard(self, peer: str, reason: str) -> None:
        """Count one discarded update of ``peer`` and why (the reason's kind, before any colon)."""
        with self._lock:
            self._rows[peer]["discard"] += 1
            self.discard_reasons[reason.split(":")[0]] += 1

    def refuse(self, reason: str) -> None:
        """Record a refused join."""
        with self._lock:
            self.refused.append(reason)

    def refuse_on_wire(self, reason: str) -> None:
        """Count one message the protected wire refused ("failed authentication", "replayed", ...)."""
        with self._lock:
            self.wire[reason] += 1

    def count(self, column: str) -> int:
        """Return the sum of ``column`` over every peer."""
        with self._lock:
            return sum(row[column] for row in self._rows.values())

    def totals(self) -> Dict[str, int]:
        """Return the Pending / Finished / Discard totals over every peer."""
        with self._lock:
            rows = list(self._rows.values())
        return {
            "Pending": sum(r["pending"] for r in rows),
            "Finished": sum(r["downloads"] + r["uploads"] for r in rows),
            "Discard": sum(r["discard"] for r in rows),
        }

    def table(self) -> str:
        """Render the ledger as a table: one row per peer and a total row."""
        table = PrettyTable(["Peer", "Pending", "Finished", "Discard", "Downloads", "Uploads"])
        with self._lock:
            rows = sorted(self._rows.items())
        for peer, row in rows:
            table.add_row([peer, row["pending"], row["downloads"] + row["uploads"], row["discard"],
                           row["downloads"], row["uploads"]])
        totals = self.totals()
        table.add_row(["total", totals["Pending"], totals["Finished"], totals["Discard"],
                       sum(r["downloads"] for _, r in rows), sum(r["uploads"] for _, r in rows)])
        lines = [table.get_string()]
        if self.discard_reasons:
            lines.append("discarded: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.discard_reasons.items())))
        if self.wire:
            lines.append("refused on the wire: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.wire.items())))
        if self.refused:
            lines.append(f"refused joins: {len(self.refused)} (last: {self.refused[-1]})")
        return "\n".join(lines)
