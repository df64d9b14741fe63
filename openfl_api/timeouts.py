"""Every wait of an API, as ``datetime.timedelta``, and how often a wait says what it waits for."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import timedelta

from openfl_api.errors import ConfigurationError

__all__ = ["Timeouts"]


@dataclass(frozen=True)
class Timeouts:
    """Every wait of an API.

    Attributes:
        idle: how long a pipe waits for the peer's next message (a frontend training, a backend
            holding a download for the next version) before the pipe is dropped.
        transfer: how long one message may take once it started.
        connect: how long a frontend tries to reach and join its backend; how long a join may take.
        drain: how long ``finish()`` on the backend waits for frontends to say goodbye.
        tick: how often the idle serve loop wakes up to fire ``at_loop``.
        heartbeat: how often each side of a pipe shows the other it is there when it has nothing
            else to send: a frontend between requests sends a heartbeat that the backend echoes,
            the backend pings a frontend whose request it handles or holds.
        link: how long a pipe may hear nothing from its peer, not even a heartbeat, before the
            link counts as cut and the pipe is dropped at both ends (a frontend then joins again).
        status: how often a wait that lasts logs what it waits for: the backend's open version
            (uploads in, uploads missing, who is connected), a frontend's download, a join.
    """

    idle: timedelta = timedelta(minutes=30)
    transfer: timedelta = timedelta(minutes=5)
    connect: timedelta = timedelta(minutes=5)
    drain: timedelta = timedelta(seconds=10)
    tick: timedelta = timedelta(milliseconds=100)
    heartbeat: timedelta = timedelta(seconds=1)
    link: timedelta = timedelta(seconds=3)
    status: timedelta = timedelta(seconds=10)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigurationError(
                    f"timeout {item.name!r} must be a positive datetime.timedelta, got {value!r}; "
                    f"write {item.name}=timedelta(seconds=...)"
                )
        if self.link < 2 * self.heartbeat:
            raise ConfigurationError(
                f"the link timeout ({self.link}) must be at least twice the heartbeat ({self.heartbeat}), or a "
                "late heartbeat would cut a live link; raise link_timeout or lower heartbeat"
            )
