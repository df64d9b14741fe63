"""Evaluation of the global model: by the frontends on their own held-out data, or by the backend.

**Federated evaluation.** :class:`FederatedEvaluation` on the backend asks the frontends to
evaluate every ``every``-th version (version 0 included) through the model's round config
(``{"evaluate": true}`` in the header of the download). A frontend's loop makes one call after
``download()``::

    def test():                                   # the global model on this client's held-out data
        logits = net(x_test)
        return len(y_test), {"accuracy": (logits.argmax(1) == y_test).float().mean().item()}

    while api.download():
        if not api.evaluate(test):                # runs test() when the version is due, reports it
            break                                 # the final model was evaluated: the federation is over
        train()
        ...

The backend aggregates the reports of each version per metric, weighted by the reported samples
(:mod:`openfl_api.metrics`), into the record's ``evaluation`` entries of kind ``"federated"``.

**The final model.** With ``final=True`` (the default), a stop asked by any step
(``StopAtVersion``, a step of one's own) waits for one more round: the backend serves the final
model to the frontends taking part with ``{"evaluate": true, "final": "<why it stops>"}``, takes
no more uploads, and stops once each of them has reported (or left, or ``final_timeout`` passed).
On the frontend, ``api.evaluate(test)`` then reports and returns False, and ``upload()`` and
``download()`` return False.

**Centralized evaluation.** :class:`CentralizedEvaluation` runs a function of one's own on the
backend for every ``every``-th version (version 0 and the final one included), on the backend's
model, and records what it returns as kind ``"centralized"``.

Both evaluation functions run under ``torch.no_grad()``; putting the model in ``eval()`` mode
and back is theirs to do.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple

import torch

from openfl_api.errors import ConfigurationError
from openfl_api.frontend import check_upload_meta
from openfl_api.step.base import BACKEND, Step, Transfer
from openfl_api.waiting import seconds

__all__ = ["FederatedEvaluation", "CentralizedEvaluation", "run_evaluation", "check_every"]


def check_every(every: Any, where: str) -> None:
    """Raise ConfigurationError unless ``every`` is an integer >= 1 (``where`` names the caller)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigurationError(f"{where}(every=...) must be an integer >= 1 (evaluate every k-th version), "
                                 f"got {every!r}")


def run_evaluation(function: Callable[[], Any], where: str, samples_required: bool = True
                   ) -> Tuple[Optional[int], Dict[str, float]]:
    """Call an evaluation function under ``torch.no_grad()``; ``(num_samples, metrics)``.

    It must return ``(num_samples, {name: number})``, or, when ``samples_required`` is False,
    just the mapping.

    Raises:
        ConfigurationError: it returned something else, or values that are not finite numbers.
    """
    with torch.no_grad():
        result = function()
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
        num_samples, metrics = result
    elif isinstance(result, Mapping) and not samples_required:
        num_samples, metrics = None, result
    else:
        shape = "(num_samples, {name: value})" + ("" if samples_required else " or {name: value}")
        raise ConfigurationError(f"the evaluation function of {where} must return {shape}, got "
                                 f"{type(result).__name__}: {str(result)[:80]}")
    try:
        checked = check_upload_meta(1 if num_samples is None else num_samples, metrics)
    except ConfigurationError as exc:
        raise ConfigurationError(f"the evaluation function of {where} returned {exc}".replace("upload(", "(")) from None
    return (None if num_samples is None else checked["num_samples"]), checked["metrics"]


class FederatedEvaluation(Step):
    """Ask the frontends to evaluate every ``every``-th version, and the final model.

    Args:
        every: evaluate versions 0, ``every``, ``2 * every``, ..., an integer >= 1.
        final: when a step asks to stop, serve the final model for evaluation first and stop once
            the frontends taking part have reported (they train no more).
        final_timeout: how long the final evaluation may wait for reports; then the federation
            stops without the missing ones (logged).

    Raises:
        ConfigurationError: an argument out of range.
    """

    roles = frozenset({BACKEND})

    def __init__(self, every: int = 1, final: bool = True, final_timeout: timedelta = timedelta(minutes=5)) -> None:
        check_every(every, "FederatedEvaluation")
        if not isinstance(final, bool):
            raise ConfigurationError(f"FederatedEvaluation(final=...) must be True or False, got {final!r}")
        if not isinstance(final_timeout, timedelta) or final_timeout <= timedelta(0):
            raise ConfigurationError(f"FederatedEvaluation(final_timeout=...) must be a positive datetime.timedelta, "
                                     f"got {final_timeout!r}")
        self.every = every
        self.final = final
        self.defers_stop = final
        self.final_timeout = final_timeout
        self._final: Optional[Tuple[int, str]] = None  # (version, why the federation stops) once the final round runs
        self._reported: Set[str] = set()
        self._since = 0.0
        self._status = 0.0

    def before_download(self, api: Any, transfer: Transfer) -> None:
        if self._final is not None:
            transfer.config.update(evaluate=True, final=self._final[1])
        else:
            transfer.config["evaluate"] = api.version % self.every == 0

    def before_upload(self, api: Any, transfer: Transfer) -> None:
        if self._final is not None:
            transfer.discard(f"final evaluation: the federation stops ({self._final[1]}); version {self._final[0]} "
                             "is being evaluated and takes no more updates")

    def after_evaluate(self, api: Any, transfer: Transfer) -> None:
        if self._final is not None and transfer.version == self._final[0]:
            self._reported.add(transfer.client)
            self._check(api)

    def on_leave(self, api: Any, peer: Any) -> None:
        if self._final is not None:
            self._check(api)

    def at_loop(self, api: Any) -> None:
        if self._final is None and self.final and api.stopping is not None:
            self._final = (api.version, api.stopping)
            self._since = self._status = time.monotonic()
            api.log.info(f"final evaluation: serving version {api.version} to the frontends for evaluation before "
                         f"the federation stops ({api.stopping})")
        if self._final is not None:
            self._check(api)

    def _check(self, api: Any) -> None:
        version = self._final[0]
        taking_part = api.expected if api.expected is not None else api.clients
        connected = set(api.clients)
        missing = [c for c in taking_part if c in connected and c not in self._reported]
        now = time.monotonic()
        if not missing:
            api.log.info(f"final evaluation of version {version}: {len(self._reported)} clients reported")
        elif now - self._since >= self.final_timeout.total_seconds():
            api.log.warning(f"final evaluation of version {version}: no report from {_listed(missing)} within "
                            f"final_timeout={self.final_timeout}; stopping without them")
        else:
            if now - self._status >= api.timeouts.status.total_seconds():
                self._status = now
                api.log.info(f"final evaluation of version {version}: {len(self._reported)} clients reported; waiting "
                             f"for {_listed(missing)} (for {seconds(now - self._since)})")
            return
        api.release_stop(self)

    def __repr__(self) -> str:
        return f"FederatedEvaluation(every={self.every}, final={self.final})"


class CentralizedEvaluation(Step):
    """Evaluate the global model on the backend with a function of one's own.

    Args:
        evaluate: called with no arguments under ``torch.no_grad()`` while the backend's model
            holds the version to evaluate (the tensors given to ``set_state_dict``); returns
            ``{name: number}`` or ``(num_samples, {name: number})``.
        every: evaluate versions 0, ``every``, ``2 * every``, ..., an integer >= 1.
        final: also evaluate the version the federation stops at.
        kind: the kind of the record's ``evaluation`` entries.

    Raises:
        ConfigurationError: an argument out of range.
    """

    roles = frozenset({BACKEND})

    def __init__(self, evaluate: Callable[[], Any], every: int = 1, final: bool = True,
                 kind: str = "centralized") -> None:
        if not callable(evaluate):
            raise ConfigurationError("CentralizedEvaluation(evaluate=...) must be a function returning "
                                     "{name: number} or (num_samples, {name: number})")
        check_every(every, "CentralizedEvaluation")
        if not isinstance(final, bool):
            raise ConfigurationError(f"CentralizedEvaluation(final=...) must be True or False, got {final!r}")
        if not isinstance(kind, str) or not kind.isidentifier() or kind in ("train", "federated"):
            raise ConfigurationError(f"CentralizedEvaluation(kind=...) must be an identifier other than 'train' and "
                                     f"'federated', got {kind!r}")
        self.evaluate = evaluate
        self.every = every
        self.final = final
        self.defers_stop = final
        self.kind = kind
        #: version -> the metrics evaluated
        self.results: Dict[int, Dict[str, float]] = {}

    def after_aggregate(self, api: Any) -> None:
        if api.version % self.every == 0:
            self._evaluate(api)

    def at_loop(self, api: Any) -> None:
        if api.version % self.every == 0 and api.version not in self.results:
            self._evaluate(api)  # the version the serve loop started at
        if self.final and api.stopping is not None:
            if api.version not in self.results:
                self._evaluate(api)
            api.release_stop(self)

    def _evaluate(self, api: Any) -> None:
        num_samples, metrics = run_evaluation(self.evaluate, type(self).__name__, samples_required=False)
        self.results[api.version] = metrics
        api.log_metrics(self.kind, metrics, version=api.version, num_samples=num_samples)
        shown = ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))
        api.log.info(f"version {api.version}: {self.kind} evaluation: {shown}")

    def __repr__(self) -> str:
        return f"CentralizedEvaluation(every={self.every}, kind={self.kind!r})"


def _listed(clients: Any, limit: int = 10) -> str:
    clients = list(clients)
    more = f" and {len(clients) - limit} more" if len(clients) > limit else ""
    return ", ".join(clients[:limit]) + more
