"""FedProx (Li et al., MLSys 2020, arXiv:1812.06127): a proximal term keeps local training near
the global model.

Each local step minimises ``F_k(w) + (mu / 2) * ||w - w_t||^2``, ``w_t`` the downloaded global
model; the server is FedAvg (:class:`~openfl_api.aggregate.AverageAggregator`). Stragglers that do
fewer local steps are still aggregated. With ``mu = 0`` nothing changes: FedAvg bit for bit.
"""

from __future__ import annotations

from typing import Iterable, Union

import torch

from openfl_api.errors import ConfigurationError
from openfl_api.strategies._common import check_number

__all__ = ["FedProx"]


def _parameters(model: Union[torch.nn.Module, Iterable[torch.Tensor]], what: str) -> list:
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else list(model)
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise ConfigurationError(f"{what} needs the model (or its parameters) it trains; got none or non-tensors")
    return params


class FedProx:
    """The proximal term of one client's local training, for the user's own loop.

    Build it right after ``api.download()`` (it keeps the downloaded parameters as ``w_t``), then
    call :meth:`correct_` after each ``backward()`` and before ``optimizer.step()``::

        prox = strategies.FedProx(net, mu=api.config.get("mu", 0.01))
        for x, y in batches:
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            prox.correct_()            # grad += mu * (w - w_t)
            optimizer.step()

    :meth:`penalty` gives the same term as a loss to add instead, for losses built by hand.

    Args:
        model: the model being trained (or its parameters), holding the global model now.
        mu: the proximal weight, >= 0; 0 leaves training unchanged.
    """

    def __init__(self, model: Union[torch.nn.Module, Iterable[torch.Tensor]], mu: float) -> None:
        self.mu = check_number(mu, "FedProx(mu=...)")
        self.params = _parameters(model, "FedProx")
        self.anchor = [p.detach().clone() for p in self.params]

    def start(self) -> None:
        """Keep the parameters as they are now as ``w_t`` (after the next download)."""
        self.anchor = [p.detach().clone() for p in self.params]

    def correct_(self) -> None:
        """Add ``mu * (w - w_t)`` to every parameter's gradient (creating it where there is none)."""
        if self.mu == 0.0:
            return
        with torch.no_grad():
            for param, anchor in zip(self.params, self.anchor):
                if not param.requires_grad:
                    continue
                term = (param - anchor) * self.mu
                if param.grad is None:
                    param.grad = term
                else:
                    param.grad.add_(term)

    def penalty(self) -> torch.Tensor:
        """``(mu / 2) * sum ||w - w_t||^2`` over the parameters, a scalar with autograd history."""
        if self.mu == 0.0:
            return torch.zeros((), dtype=self.params[0].dtype)
        total = sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchor))
        return total * (self.mu / 2)

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu:g})"
