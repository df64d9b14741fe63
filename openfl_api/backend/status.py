"""The backend's status line: what the open version has and what it waits for.

The serve loop logs it at INFO every ``status`` interval while a version stays open, and pipes
send it to frontends whose download is held, so a stalled federation names what is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

from openfl_api.payload import encode_header
from openfl_api.versions import client_order

__all__ = ["VersionStatus", "Reporter", "names"]


def plural(count: int, noun: str) -> str:
    """``"1 upload"``, ``"2 uploads"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


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
        start: asynchronous mode before the start: ``(frontends ready, needed)``.
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
            return (f"version {self.version}: asynchronous start waits for {need} frontends to ask for a model, "
                    f"{have} have; waiting for {names(self.missing)}; connected: {names(self.connected)}")
        of = f" of {self.needed}" if self.needed is not None else ""
        head = f"version {self.version}: {self.accepted}{of} uploads"
        if self.uploaded:
            head += f" (from {names(self.uploaded)})"
        if self.asynchronous:
            return f"{head}; connected: {names(self.connected)}"
        return f"{head}; waiting for {names(self.missing)}; connected: {names(self.connected)}"

    def unmet(self) -> Optional[str]:
        """Why the connected frontends cannot complete the version (or the asynchronous start), with
        the fix; None when they can."""
        if self.start is not None:
            have, need = self.start
            if need - have <= len(self.missing) - len(self.unconnected):
                return None
            start = f"start {names(self.unconnected)} or " if self.unconnected else ""
            return (f"The connected frontends cannot start it: the asynchronous start waits for "
                    f"{plural(need, 'frontend')} to ask for a model and only {have} have; {start}lower "
                    "Asynchronous(min_frontends=...)")
        if self.asynchronous or self.needed is None:
            return None
        short = self.needed - self.accepted
        can = len(self.missing) - len(self.unconnected)
        if short <= can:
            return None
        fix = (f"start {names(self.unconnected)} or lower the count the step needs" if self.unconnected else
               "every frontend the address's world_size allows is connected: raise world_size and start more "
               "frontends, or lower the count the step needs")
        return (f"The connected frontends cannot complete it: {self.needed_by} needs {plural(short, 'more upload')} "
                f"and only {plural(can, 'connected client')} {'has' if can == 1 else 'have'} yet to upload; {fix}")


class Reporter:
    """Builds the backend's status, logs it while a version stays open, and keeps the ping header.

    Args:
        server: the :class:`~openfl_api.backend.server.Server` whose loop calls :meth:`tick`.
        needs: ``needs()`` returns ``(uploads, step)`` the attached steps need, or None.
    """

    def __init__(self, server: Any, needs: Callable[[], Optional[Tuple[int, str]]]) -> None:
        self.server = server
        self._needs = needs
        self._version = -1
        self._due = 0.0
        self._ping_due = 0.0
        self._ping = encode_header({"version": 0})

    def status(self) -> VersionStatus:
        """What the current version has and what it waits for."""
        server = self.server
        exchange, versions = server.exchange, server.exchange.versions
        many = len(server.addresses.lobbies) > 1

        def who(worker: Any) -> str:
            return worker.label if many else str(worker.peer.rank)

        def name(client: str) -> str:
            worker = exchange.clients.get(client)
            return who(worker) if worker is not None and not worker.hosts_many else client

        workers = sorted(server.workers.values(), key=lambda w: (w.label, w.peer.rank))
        connected_ranks = {(w.peer.address.init_method, w.peer.rank) for w in workers}
        unconnected = [f"{init}/rank{r}" if many else str(r) for init, ranks in server.addresses.frontend_ranks.items()
                       for r in ranks if (init, r) not in connected_ranks]
        done = versions.uploaded_now()
        expected = exchange.accumulation.expected(versions.version)
        if expected is not None:
            missing = [name(c) for c in expected if c not in done]
            unconnected = [c for c in expected if c not in exchange.clients]
        else:
            pending = [c for c in exchange.clients if c not in done]
            missing = [name(c) for c in sorted(pending, key=client_order)] + unconnected
        needs = self._needs()
        status = VersionStatus(
            version=versions.version, accepted=versions.accepted,
            needed=None if needs is None else needs[0], needed_by="" if needs is None else needs[1],
            uploaded=[name(c) for c in sorted(done, key=client_order)], missing=missing,
            connected=[who(w) for w in workers], unconnected=unconnected,
            asynchronous=server.asynchronous is not None,
        )
        if not exchange.started:
            status.start = (exchange.ready(), server.start_frontends())
            status.missing = [who(w) for w in workers if w.clients is None] + unconnected
        return status

    def ping_header(self) -> bytes:
        """The header of the pings sent to frontends whose download is held: the backend's status."""
        return self._ping

    def tick(self) -> None:
        """After a turn: refresh the ping header every heartbeat; log the status line every
        ``status`` interval of a version that stays open."""
        server = self.server
        now = time.monotonic()
        if server.version != self._version:  # a new version: its interval starts now
            self._version = server.version
            self._due = now + server.timeouts.status.total_seconds()
        if now < self._ping_due and now < self._due:
            return
        status = self.status()
        line = status.line()
        self._ping = encode_header({"version": server.version, "status": line})
        self._ping_due = now + server.timeouts.heartbeat.total_seconds()
        if now >= self._due and server.stop_reason is None:
            self._due = now + server.timeouts.status.total_seconds()
            unmet = status.unmet()
            if unmet is None:
                server.log.info(line)
            else:
                server.log.warning(f"{line}. {unmet}")
