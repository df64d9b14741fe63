"""FedDyn (Acar et al., ICLR 2021, arXiv:2111.04263): dynamic regularisation aligns the clients'
local optima with the global one.

Each client keeps ``g_k`` (zeros at first) and minimises
``L_k(theta) - <g_k, theta> + (alpha / 2) * ||theta - theta_prev||^2`` from the downloaded
``theta_prev``; afterwards ``g_k = g_k - alpha * (theta_k - theta_prev)``. The backend keeps ``h``::

    h      = h - alpha * (1 / N) * sum_k (theta_k - theta_prev)
    theta  = mean_k theta_k - h / alpha

Only the model travels. No ``alpha`` gives FedAvg; in the first round with every client taking
part the server step doubles the mean update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Dict, Optional

import torch

from openfl_api.aggregate.updates import UpdateAggregator
from openfl_api.errors import ConfigurationError
from openfl_api.strategies._common import check_number, check_version, next_state, start_value

__all__ = ["FedDyn", "FedDynClient"]


class FedDyn(UpdateAggregator):
    """FedDyn's backend: the mean of the models corrected by ``h``.

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        alpha: the regularisation weight, > 0 (the paper tunes it in {0.1, 0.01, 0.001}).
        num_clients: ``N``, the clients of the federation; None takes the uploads of each version.
        max_norm: clip each model update's norm to this value; None does not clip.

    Raises:
        ConfigurationError: an argument is out of range.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, alpha: float, num_clients: Optional[int] = None,
                 max_norm: Optional[float] = None) -> None:
        self.alpha = check_number(alpha, "FedDyn(alpha=...)", 0.0, strict=True)
        if num_clients is not None and (isinstance(num_clients, bool) or not isinstance(num_clients, int)
                                        or num_clients < 1):
            raise ConfigurationError(f"FedDyn(num_clients=...) must be an int >= 1 or None, got {num_clients!r}")
        super().__init__(params, max_norm=max_norm, weighted=False)
        self.num_clients = num_clients
        self._h: Dict[str, torch.Tensor] = {}

    @property
    def h(self) -> Dict[str, torch.Tensor]:
        """Backend: the server state ``h`` per parameter (float64; zeros at first)."""
        for name, param in zip(self.param_names, self._params):
            if name not in self._h:
                self._h[name] = torch.zeros(param.shape, dtype=torch.float64)
        return self._h

    def _compute(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        participants = self.num_clients if self.num_clients is not None else self.count
        total = self.total_weight
        reference = self._reference_sum(current)
        result = {}
        for name in self.param_names:
            summed = self._sum_of(name, torch.float64)
            # sum_k (theta_k - theta_prev), weighted as the mean is (staleness in asynchronous mode)
            update = (summed - reference[name]) * (self.count / total)
            self.h[name] = self.h[name] - self.alpha / participants * update
            result[name] = (summed / total - self.h[name] / self.alpha).to(current[name].dtype)
        return result

    def server_state(self) -> Dict[str, Any]:
        return {"h": {n: t.clone() for n, t in self.h.items()}}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self._h = {n: t.clone() for n, t in state["h"].items()}

    def client(self, state: Optional[Mapping[str, Any]] = None, version: int = 0) -> "FedDynClient":
        """Frontend: the helper for one client's local training of the version just downloaded.

        Args:
            state: this client's state from its last :meth:`FedDynClient.finish`, or None at first.
            version: the version trained from (``api.version``, or ``client.version``).
        """
        return FedDynClient(self, state, version)

    def __repr__(self) -> str:
        return f"FedDyn(alpha={self.alpha:g}, num_clients={self.num_clients})"


class FedDynClient:
    """One client's FedDyn term for one version, inside the user's loop::

        local = feddyn.client(state=state, version=api.version)
        for x, y in batches:
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            local.correct_()                 # grad += -g_k + alpha * (theta - theta_prev)
            optimizer.step()
        state = local.finish()

    Built right after the download, while the model holds ``theta_prev``.
    """

    def __init__(self, aggregator: FedDyn, state: Optional[Mapping[str, Any]], version: int) -> None:
        if not isinstance(aggregator, FedDyn):
            raise ConfigurationError(f"FedDynClient needs the FedDyn aggregator, got {type(aggregator).__name__}")
        self.aggregator = aggregator
        self.alpha = aggregator.alpha
        self.version = check_version(version, "FedDynClient(version=...)")
        self.params = aggregator.params
        self.g = start_value(state, self.version, lambda: [torch.zeros_like(p.detach()) for p in self.params],
                             "FedDynClient(state=...)")
        self.start = [p.detach().clone() for p in self.params]

    def correct_(self) -> None:
        """Add ``-g_k + alpha * (theta - theta_prev)`` to every parameter's gradient."""
        with torch.no_grad():
            for param, g, start in zip(self.params, self.g, self.start):
                term = (param - start) * self.alpha - g
                if param.grad is None:
                    param.grad = term
                else:
                    param.grad.add_(term)

    def finish(self) -> Dict[str, Any]:
        """Updates ``g_k = g_k - alpha * (theta_k - theta_prev)`` and returns the new state."""
        with torch.no_grad():
            new = [g - (p.detach() - start) * self.alpha for g, p, start in zip(self.g, self.params, self.start)]
        return next_state(self.version, new, self.g)
