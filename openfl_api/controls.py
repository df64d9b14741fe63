"""What a running federation shows and what steps ask of it, through the API.

Steps (and scripts) read ``api.version``, ``api.accepted``, ``api.clients``, ... and act with
``api.aggregate()``, ``api.stop(reason)``, ``api.save_checkpoint(path)``, ``api.expect(...)``;
these are the methods of :class:`Controls`, which :class:`~openfl_api.api.API` includes. On the
backend they reach the serve loop; on a frontend what applies to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Union

from openfl_api import checkpoint
from openfl_api.asynchronous import Asynchronous
from openfl_api.errors import RoleError
from openfl_api.metrics import History
from openfl_api.payload.config import check_config
from openfl_api.record import check_log_metrics
from openfl_api.step import BACKEND, Step
from openfl_api.transport.rendezvous import Peer

__all__ = ["Controls"]


class Controls:
    """The part of :class:`~openfl_api.api.API` that steps read and act through.

    Expects ``_server`` (the backend's :class:`~openfl_api.backend.Server` or None), ``_client``
    (the frontend's :class:`~openfl_api.frontend.Client` or None), ``_hosted``, ``_asynchronous``,
    ``_steps``, ``_recorder`` (the backend's :class:`~openfl_api.record.Recorder` or None),
    ``_stopping``, ``_released`` and ``log`` on the object.
    """

    _server: Any
    _client: Any
    _hosted: Optional[List[str]]
    _asynchronous: Optional[Asynchronous]
    _steps: Any
    _recorder: Any
    _stopping: Optional[str]
    _released: Set[int]
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
    def config(self) -> Dict[str, Any]:
        """The round config: a small JSON object served beside the model.

        Backend: the config every download carries from now on (``{}`` at first); backend steps
        set it, e.g. ``api.config = {"lr": 0.1 * 0.5 ** (api.version // 10)}``, and checkpoints
        keep it; a step may add entries to one download's config in ``before_download``
        (``transfer.config``). Frontend: the config of the model downloaded last (``{}`` if
        none), with the keys the library uses: ``"evaluate"`` (this version is to be evaluated),
        ``"final"`` (why the federation stops: the model is the final one, served for evaluation
        only). Either way a fresh copy.
        """
        if self._server is not None:
            return check_config(self._server.exchange.config)
        if self._client is not None:
            return dict(self._client.config)
        return {}

    @config.setter
    def config(self, config: Mapping[str, Any]) -> None:
        """Backend: serve ``config`` with every download from now on.

        Raises:
            RoleError: this API is not a connected backend.
            ConfigurationError: ``config`` is not a dict of str to JSON values of at most 64 KiB.
        """
        server = self._require_server("setting api.config")
        server.exchange.config = check_config(config, where="api.config")

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

    def stop(self, reason: str, *, at_once: bool = False) -> None:
        """End the federation after the event at hand (backend), or stop this frontend's calls.

        On the backend, attached steps with ``defers_stop`` (``FederatedEvaluation`` evaluating
        the final model) keep the stop pending until they release it (``api.stopping``), unless
        ``at_once``.
        """
        if self._server is not None:
            if not at_once and self._server.stop_reason is None and self._deferring():
                if self._stopping is None:
                    self._stopping = reason
                    names = ", ".join(repr(s) for s in self._deferring())
                    self.log.info(f"stopping once {names} {'has' if len(self._deferring()) == 1 else 'have'} "
                                  f"finished: {reason}")
                return
            self._server.stop(reason)
        elif self._client is not None and not self._client.ended:
            self._client._end(reason, quiet=True)
            self.log.info(f"stopped: {reason}")

    @property
    def stopping(self) -> Optional[str]:
        """Backend: the reason of a stop that steps with ``defers_stop`` keep pending, else None."""
        return self._stopping

    def release_stop(self, step: Step) -> None:
        """Backend: ``step`` (one with ``defers_stop``) no longer holds the pending stop; once no
        such step holds it, the federation stops with the pending reason."""
        self._released.add(id(step))
        if self._stopping is not None and not self._deferring():
            self._require_server("release_stop()").stop(self._stopping)

    def _deferring(self) -> List[Step]:
        return [s for s in self._steps if getattr(s, "defers_stop", False) and BACKEND in s.roles
                and id(s) not in self._released]

    def save_checkpoint(self, path: Union[str, Path]) -> None:
        """Backend: write everything needed to resume to ``path`` atomically: the global model,
        version, aggregator and server-optimizer state, the steps' state and the random generators
        (``torch.load(path, weights_only=True)`` reads it).

        Called from a step while the serve loop handles an event, the file is written once every
        step has seen that event, so the saved state of the steps is consistent."""
        server = self._require_server("save_checkpoint()")
        server.checkpoint(str(path), self._step_states)

    def _step_states(self) -> Dict[str, Any]:
        """The steps' state for a checkpoint; the record's under a key of its own, whatever the steps."""
        states = checkpoint.step_states([s for s in self._steps if s is not self._recorder])
        if self._recorder is not None:
            states["record"] = self._recorder.state_dict()
        return states

    @property
    def history(self) -> Optional[History]:
        """Backend: the aggregated metrics and time split per version of this run (what the record
        holds), or None before ``run()`` and with ``API(record=False)``."""
        return self._recorder.history if self._recorder is not None else None

    def log_metrics(self, kind: str, metrics: Mapping[str, float], *, version: Optional[int] = None,
                    num_samples: Optional[int] = None) -> None:
        """Backend: record metrics of one's own for a version, e.g. a centralized evaluation.

        Args:
            kind: the record's kind for them, an identifier (``"centralized"``, ``"test"``); not
                ``"train"`` or ``"federated"``, which the backend fills itself.
            metrics: ``{name: finite number}``.
            version: the version they describe; default the current one.
            num_samples: the samples behind them, if any.

        Raises:
            ConfigurationError: an argument that does not fit.
            RoleError: called on a frontend.
        """
        server = self._require_server("log_metrics()")
        version = server.version if version is None else version
        checked = check_log_metrics(kind, metrics, version, num_samples)
        if self._recorder is not None:
            self._recorder.log_metrics(kind, checked, version, num_samples)
