"""FedNova (Wang et al., NeurIPS 2020, arXiv:2007.07481): normalised averaging removes the bias of
clients that take different numbers of local steps.

Each client reports its normaliser ``||a_i||_1`` (``extra/fednova/norm``, a float64 scalar): the
number of local steps ``tau_i`` for plain SGD, ``[tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho)``
for SGD with momentum ``rho``, ``[1 - (1 - lr mu)^tau] / (lr mu)`` for the proximal solver. With
``p_i`` the clients' weights (``num_samples``) and ``d_i = x - y_i``::

    tau_eff = sum_i p_i ||a_i||_1
    x       = x - tau_eff * sum_i p_i d_i / ||a_i||_1

With equal normalisers this is FedAvg (up to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Dict, List, Optional

import torch

from openfl_api.aggregate.server_opt import ServerOptimizer
from openfl_api.aggregate.updates import UpdateAggregator
from openfl_api.errors import ConfigurationError
from openfl_api.strategies._common import check_number

__all__ = ["FedNova", "FedNovaClient", "NORM"]

#: The upload extra that carries a client's normaliser.
NORM = "extra/fednova/norm"


class FedNova(UpdateAggregator):
    """FedNova's backend: the normalised average of the clients' updates.

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        weighted: ``p_i`` proportional to ``num_samples`` (the paper); False weighs equally.
        server: a server optimizer applied to the normalised pseudo-gradient (the paper's server
            momentum is ``FedAvgM(lr=1.0, momentum=...)``), or None.
        max_norm: clip each model update's norm to this value; None does not clip.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, weighted: bool = True,
                 server: Optional[ServerOptimizer] = None, max_norm: Optional[float] = None) -> None:
        super().__init__(params, server=server, max_norm=max_norm, weighted=weighted)
        self._tau_terms: List[float] = []

    def extra_layout(self):
        return {}, {NORM: (torch.float64, ())}

    def _record(self, tensors: Mapping[str, torch.Tensor], num_samples: int, weight: float,
                peak: Optional[float], context: Optional[Mapping[str, Any]]) -> None:
        if NORM not in tensors:
            raise ConfigurationError(f"the upload lacks {NORM!r}: call FedNovaClient.finish() before api.upload()")
        norm = float(tensors[NORM])
        if not math.isfinite(norm) or norm <= 0:
            raise ConfigurationError(f"{NORM} must be > 0 (the client's local steps, normalised), got {norm}")
        self._tau_terms.append(float(self.effective_weight(num_samples, weight)) * norm)
        super()._record(tensors, num_samples, weight / norm, peak, context)

    def _compute(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        plain = math.fsum(self._plain)
        tau_eff = math.fsum(self._tau_terms) / plain
        reference = self._reference_sum(current)
        gradient = {n: (reference[n] - self._sum_of(n, torch.float64)) * (tau_eff / plain) for n in self.param_names}
        return self._step_params(current, gradient)

    def reset(self) -> None:
        super().reset()
        self._tau_terms = []

    def server_state(self) -> Dict[str, Any]:
        return {"tau_terms": list(self._tau_terms)}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self._tau_terms = [float(t) for t in state["tau_terms"]]

    def client(self, optimizer: torch.optim.Optimizer, mu: float = 0.0) -> "FedNovaClient":
        """Frontend: the helper that counts one client's local steps (see :class:`FedNovaClient`)."""
        return FedNovaClient(self, optimizer, mu)

    def __repr__(self) -> str:
        return f"FedNova(weighted={self.weighted})"


class FedNovaClient:
    """Counts one client's local steps into its normaliser ``||a||_1``, inside the user's loop::

        local = fednova.client(optimizer)             # or client(optimizer, mu=0.01): proximal
        for x, y in batches:
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            local.correct_()                          # counts the step (and adds mu (w - w_t))
            optimizer.step()
        local.finish()                                # stages ||a||_1 for api.upload()

    The momentum ``rho`` and the learning rate come from the optimizer (an SGD whose parameter
    groups share them); its momentum buffers should start from zero each round.

    Args:
        aggregator: the :class:`FedNova` aggregator.
        optimizer: the local ``torch.optim.SGD``.
        mu: the proximal weight of FedProx's local solver, >= 0; it cannot be combined with momentum.
    """

    def __init__(self, aggregator: FedNova, optimizer: torch.optim.Optimizer, mu: float = 0.0) -> None:
        if not isinstance(aggregator, FedNova):
            raise ConfigurationError(f"FedNovaClient needs the FedNova aggregator, got {type(aggregator).__name__}")
        if not isinstance(optimizer, torch.optim.SGD):
            raise ConfigurationError("FedNova's normaliser is known for SGD (plain, momentum or proximal); got "
                                     f"{type(optimizer).__name__}")
        groups = optimizer.param_groups
        momenta = {float(g.get("momentum", 0.0)) for g in groups}
        rates = {float(g["lr"]) for g in groups}
        if len(momenta) != 1 or len(rates) != 1 or any(g.get("nesterov") or g.get("dampening", 0) for g in groups):
            raise ConfigurationError("FedNovaClient needs one lr and one momentum for every parameter group, "
                                     "without nesterov or dampening")
        self.aggregator = aggregator
        self.momentum = momenta.pop()
        self.lr = rates.pop()
        self.mu = check_number(mu, "FedNovaClient(mu=...)")
        if self.mu > 0 and self.momentum > 0:
            raise ConfigurationError("FedNova's normaliser is known for momentum or the proximal term, not both; "
                                     "use mu=0 with momentum, or an SGD without momentum with mu > 0")
        self.params = aggregator.params
        self.start = [p.detach().clone() for p in self.params] if self.mu > 0 else []
        self.steps = 0
        self.norm = 0.0
        self._counter = 0.0

    def correct_(self) -> None:
        """Counts one local step into the normaliser; with ``mu > 0`` also adds ``mu * (w - w_t)``
        to the gradients."""
        self.steps += 1
        if self.mu > 0:
            self.norm = self.norm * (1 - self.lr * self.mu) + 1
            with torch.no_grad():
                for param, start in zip(self.params, self.start):
                    term = (param - start) * self.mu
                    if param.grad is None:
                        param.grad = term
                    else:
                        param.grad.add_(term)
        elif self.momentum > 0:
            self._counter = self.momentum * self._counter + 1
            self.norm += self._counter
        else:
            self.norm += 1

    def finish(self) -> float:
        """Stages ``||a||_1`` for the upload and returns it.

        Raises:
            ConfigurationError: no step was counted.
        """
        if self.steps == 0:
            raise ConfigurationError("FedNovaClient.finish() found no local step: call correct_() after each "
                                     "backward(), before optimizer.step()")
        self.aggregator.stage({NORM: torch.tensor(self.norm, dtype=torch.float64)})
        return self.norm
