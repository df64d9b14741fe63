"""Steps about the clients: ``ClientSampling`` chooses who takes part, ``ReportSilent`` names who does not."""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional

from openfl_api.errors import ConfigurationError
from openfl_api.step.base import BACKEND, Step, Transfer

__all__ = ["ClientSampling", "ReportSilent"]


class ClientSampling(Step):
    """Choose the clients that take part in each version; the others wait.

    For each version a seeded generator draws from the connected clients (sorted, so the draw
    depends only on the seed, the version and who is connected), once at least ``min_clients``
    have connected. Downloads of clients not drawn are held until a version draws them; their
    uploads are discarded. The draw is declared with ``api.expect(...)``, so the status line names
    the drawn clients that have not uploaded yet.

    Args:
        fraction: the share of connected clients per version, in ``(0, 1]`` (at least one).
        count: or the number of clients per version, >= 1 (all of them if fewer are connected).
        seed: the seed of the draws.
        min_clients: clients that must be connected before the first draw of a version;
            default ``count``, or 1 with ``fraction``.
    """

    roles = frozenset({BACKEND})

    def __init__(self, fraction: Optional[float] = None, count: Optional[int] = None, seed: int = 0,
                 min_clients: Optional[int] = None) -> None:
        if (fraction is None) == (count is None):
            raise ConfigurationError("ClientSampling needs exactly one of fraction=... or count=...")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
                                     or not 0 < fraction <= 1):
            raise ConfigurationError(f"ClientSampling(fraction=...) must be in (0, 1], got {fraction!r}")
        for label, value in (("count", count), ("min_clients", min_clients)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"ClientSampling({label}=...) must be an int >= 1, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"ClientSampling(seed=...) must be an int >= 0, got {seed!r}")
        self.fraction, self.count, self.seed = fraction, count, seed
        self.min_clients = min_clients if min_clients is not None else (count or 1)
        self._drawn: Optional[int] = None
        self._chosen: frozenset = frozenset()

    def draw(self, clients: List[str], version: int) -> List[str]:
        """The clients drawn for ``version`` out of ``clients`` (given in sorted order)."""
        import numpy as np

        k = self.count if self.count is not None else max(1, round(self.fraction * len(clients)))
        k = min(k, len(clients))
        rng = np.random.default_rng([self.seed, version])
        picked = np.sort(rng.choice(len(clients), size=k, replace=False))
        return [clients[i] for i in picked]

    def _current(self, api: Any) -> bool:
        if self._drawn == api.version:
            return True
        clients = api.clients
        if len(clients) < self.min_clients:
            return False
        chosen = self.draw(clients, api.version)
        api.expect(chosen)
        self._drawn, self._chosen = api.version, frozenset(chosen)
        api.log.info(f"version {api.version}: sampled {len(chosen)} of {len(clients)} clients")
        return True

    def before_download(self, api: Any, transfer: Transfer) -> None:
        if not self._current(api):
            transfer.hold(f"waiting for {self.min_clients} clients to sample from ({len(api.clients)} connected)")
            return
        chosen = [c for c in transfer.clients if c in self._chosen]
        if chosen:
            transfer.clients = chosen
        else:
            transfer.hold(f"not sampled for version {api.version}")

    def before_upload(self, api: Any, transfer: Transfer) -> None:
        if self._drawn == api.version and transfer.version == api.version and transfer.client not in self._chosen:
            transfer.discard(f"not sampled: client {transfer.client} was not drawn for version {api.version}")

    def __repr__(self) -> str:
        amount = f"fraction={self.fraction}" if self.fraction is not None else f"count={self.count}"
        return f"ClientSampling({amount}, seed={self.seed})"


class ReportSilent(Step):
    """After each aggregation, log the connected clients with no accepted upload for ``versions`` versions.

    A client's upload for version ``v`` counts for ``v``; a client that joined during version
    ``v`` counts as having uploaded for ``v - 1``. ``silent`` holds the last report: client id ->
    versions missed in a row.
    """

    roles = frozenset({BACKEND})

    def __init__(self, versions: int) -> None:
        if isinstance(versions, bool) or not isinstance(versions, int) or versions < 1:
            raise ConfigurationError(f"ReportSilent(versions=...) must be an int >= 1, got {versions!r}")
        self.versions = versions
        self._last: Dict[str, int] = {}
        self.silent: Dict[str, int] = {}

    def after_upload(self, api: Any, transfer: Transfer) -> None:
        if transfer.accepted:
            self._last[transfer.client] = transfer.version

    def after_aggregate(self, api: Any) -> None:
        for client in api.clients:
            self._last.setdefault(client, api.version - 1)
        missed = {c: api.version - self._last[c] - 1 for c in api.clients}
        self.silent = {c: n for c, n in missed.items() if n >= self.versions}
        if self.silent:
            listed = ", ".join(f"{c} ({n})" for c, n in list(self.silent.items())[:20])
            api.log.warning(f"version {api.version}: {len(self.silent)} clients have not uploaded for "
                            f"{self.versions} or more versions: {listed}")

    def state_dict(self) -> Dict[str, Any]:
        """The last accepted upload version per client, for an exact resume."""
        return {"last": dict(self._last)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._last = {str(k): int(v) for k, v in state["last"].items()}

    def __repr__(self) -> str:
        return f"ReportSilent(versions={self.versions})"
