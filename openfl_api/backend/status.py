"""The backend's status line: what the open version has and what it waits for.

The serve loop logs it at INFO every ``status`` interval while a version stays open, and pipes
send it to frontends whose download is held, so a stalled federation names what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

__all__ = ["VersionStatus", "names"]


def names(items: Sequence[str], limit: int = 10) -> str:
    """``"1, 2, 3"``, ``"none"``, or the first ``limit`` and how many more."""
    if not items:
        return "none"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


@dataclass
class VersionStatus:
    """What the current version has and what it waits for.

    Attributes:
        version: the global version being built.
        accepted: uploads accepted for it.
        needed: uploads the attached steps need to aggregate it (the largest they name), or None.
        needed_by: the step that needs them, e.g. ``"AggregateCount(count=3)"``.
        uploaded: who has an accepted upload for it (ranks, or client ids).
        missing: who is expected but has none (ranks, or client ids), connected or not.
        connected: who is connected.
        unconnected: the expected ones among ``missing`` that are not connected.
        asynchronous: asynchronous mode (any client may upload again; no one is "missing").
        start: asynchronous mode before the start: ``(connected frontends, needed)``.
    """

    version: int
    accepted: int
    needed: Optional[int] = None
    needed_by: str = ""
    uploaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    connected: List[str] = field(default_factory=list)
    unconnected: List[str] = field(default_factory=list)
    asynchronous: bool = False
    start: Optional[tuple] = None

    def line(self) -> str:
        """``"version 3: 1 of 3 uploads (from 2); waiting for 1, 3; connected: 1, 2"``."""
        if self.start is not None:
            have, need = self.start
            return (f"version {self.version}: asynchronous start waits for {need} frontends, {have} connected; "
                    f"waiting for {names(self.missing)}; connected: {names(self.connected)}")
        of = f" of {self.needed}" if self.needed is not None else ""
        head = f"version {self.version}: {self.accepted}{of} uploads"
        if self.uploaded:
            head += f" (from {names(self.uploaded)})"
        if self.asynchronous:
            return f"{head}; connected: {names(self.connected)}"
        return f"{head}; waiting for {names(self.missing)}; connected: {names(self.connected)}"

    def unmet(self) -> Optional[str]:
        """Why the needed count cannot be met by the connected frontends, with the fix; None if it can."""
        if self.asynchronous or self.needed is None or self.start is not None:
            return None
        short = self.needed - self.accepted
        can = len(self.missing) - len(self.unconnected)
        if short <= can:
            return None
        start = f"start {names(self.unconnected)} or " if self.unconnected else ""
        return (f"version {self.version} cannot be aggregated by the connected frontends: {self.needed_by} needs "
                f"{short} more uploads and only {can} connected clients have not uploaded for it; {start}lower the "
                "count the step needs")
