"""What a running federation shows and what steps ask of it, through the API.

Steps (and scripts) read ``api.version``, ``api.accepted``, ``api.clients``, ... and act with
``api.aggregate()``, ``api.stop(reason)``, ``api.save_checkpoint(path)``, ``api.expect(...)``;
these are the methods of :class:`Controls`, which :class:`~openfl_api.api.API` includes. On the
backend they reach the serve loop; on a frontend what applies to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from openfl_api import checkpoint
from openfl_api.asynchronous import Asynchronous
from openfl_api.errors import RoleError
from openfl_api.payload.config import check_config
from openfl_api.transport.rendezvous import Peer

__all__ = ["Controls"]


class Controls:
    """The part of :class:`~openfl_api.api.API` that steps read and act through.

    Expects ``_server`` (the backend's :class:`~openfl_api.backend.Server` or None), ``_client``
    (the frontend's :class:`~openfl_api.frontend.Client` or None), ``_hosted``, ``_asynchronous``,
    ``_steps`` and ``log`` on the object.
    """

    _server: Any
    _client: Any
    _hosted: Optional[List[str]]
    _asynchronous: Optional[Asynchronous]
    _steps: Any
    log: Any

    @property
    def version(self) -> int:
        """Backend: the global version. Frontend: the local version."""
        if self._server is not None:
            return self._server.version
        if self._client is not None:
            return self._client.version
        return 0

    @property
    def accepted(self) -> int:
        """Backend: uploads accepted for the current version (since the last aggregation)."""
        return self._require_server("accepted").accepted

    @property
    def loop_count(self) -> int:
        """Backend: serve-loop iterations so far."""
        return self._require_server("loop_count").loop_count

    @property
    def frontends(self) -> List[Peer]:
        """Backend: the frontends connected now."""
        return self._require_server("frontends").frontends

    @property
    def clients(self) -> List[str]:
        """Backend: the ids of the connected clients. Frontend: the hosted clients taking part in
        the version downloaded last (all hosted ones unless the backend samples)."""
        if self._server is not None:
            return self._server.clients
        if self._client is not None:
            return list(self._client.selected)
        return list(self._hosted or [])

    @property
    def expected(self) -> Optional[List[str]]:
        """Backend: the clients the current version expects uploads from (see :meth:`expect`), or None."""
        return self._require_server("expected").expected

    def expect(self, clients: Sequence[str]) -> None:
        """Backend: declare the clients taking part in the current version (steps such as
        ``ClientSampling`` call it); the status line and fractional quorums count them."""
        self._require_server("expect()").expect(list(clients))

    @property
    def asynchronous(self) -> Optional[Asynchronous]:
        """The asynchronous settings, or None in synchronous mode."""
        return self._asynchronous

    @property
    def round_config(self) -> Dict[str, Any]:
        """The round configuration: a small JSON object served beside the model.

        Backend: the configuration every download carries from now on (``{}`` at first); backend
        steps set it, e.g. ``api.round_config = {"lr": 0.1 * 0.5 ** (api.version // 10)}``, and
        checkpoints keep it. Frontend: the configuration of the last download (``{}`` before the
        first). Either way a fresh copy.
        """
        if self._server is not None:
            return check_config(self._server.exchange.config)
        if self._client is not None:
            return check_config(self._client.config)
        return {}

    @round_config.setter
    def round_config(self, config: Mapping[str, Any]) -> None:
        """Backend: serve ``config`` with every download from now on.

        Raises:
            RoleError: this API is not a connected backend.
            ConfigurationError: ``config`` is not a dict of str to JSON values of at most 64 KiB.
        """
        server = self._require_server("setting round_config")
        server.exchange.config = check_config(config)

    @property
    def stop_reason(self) -> Optional[str]:
        """Why the federation stopped, or None while it runs."""
        if self._server is not None:
            return self._server.stop_reason
        if self._client is not None and self._client.ended:
            return self._client.end_reason
        return None

    def _require_server(self, what: str) -> Any:
        if self._server is None:
            raise RoleError(f"{what} belongs to the backend, and this API is not a connected backend")
        return self._server

    def aggregate(self) -> bool:
        """Backend: fold accepted uploads into a new version; False if none was accepted. Asked from
        a step, it happens once every step has seen the event at hand."""
        return self._require_server("aggregate()").aggregate()

    def stop(self, reason: str) -> None:
        """End the federation after the event at hand (backend), or stop this frontend's calls."""
        if self._server is not None:
            self._server.stop(reason)
        elif self._client is not None and not self._client.ended:
            self._client._end(reason, quiet=True)
            self.log.info(f"stopped: {reason}")

    def save_checkpoint(self, path: Union[str, Path]) -> None:
        """Backend: write everything needed to resume to ``path`` atomically: the global model,
        version, aggregator and server-optimizer state, the steps' state and the random generators
        (``torch.load(path, weights_only=True)`` reads it).

        Called from a step while the serve loop handles an event, the file is written once every
        step has seen that event, so the saved state of the steps is consistent."""
        server = self._require_server("save_checkpoint()")
        server.checkpoint(str(path), lambda: checkpoint.step_states(list(self._steps)))
