"""Attacks for simulation: make chosen clients send malicious updates, to show and test robustness.

An attack replaces a client's trained model ``y`` (started from the global model ``x``) before it
is uploaded; ``VirtualClients(..., attack=...)`` applies it to the clients it names:

- :class:`SignFlip`: ``x - scale * (y - x)``, the client's own update negated (and scaled);
- :class:`ScaledUpdate`: ``x + factor * (y - x)``, an update boosted to dominate the mean (model
  replacement with ``factor`` about the number of clients);
- :class:`GaussianUpdate`: ``x + N(0, std^2)``, a random update drawn afresh each round from the
  client's generator.

Every floating tensor of the model's ``state_dict`` is attacked; integer buffers are left as
trained. An attack with no clients changes nothing.
"""

from __future__ import annotations

from typing import Iterable, List, Union

import torch

from openfl_api.errors import ConfigurationError
from openfl_api.strategies._common import check_number

__all__ = ["Attack", "SignFlip", "ScaledUpdate", "GaussianUpdate"]


class Attack:
    """Base of the attacks: which clients are malicious, and what they do to their model.

    Args:
        clients: the ids of the malicious clients (ints or str, as the API names clients).
    """

    def __init__(self, clients: Iterable[Union[int, str]]) -> None:
        if isinstance(clients, (str, bytes)) or not hasattr(clients, "__iter__"):
            raise ConfigurationError(f"{type(self).__name__}(clients=...) must be a collection of client ids, e.g. "
                                     f"[0, 3]; got {clients!r}")
        ids = []
        for client in clients:
            if isinstance(client, bool) or not isinstance(client, (int, str)) or (isinstance(client, int) and client < 0):
                raise ConfigurationError(f"{type(self).__name__}(clients=...) holds {client!r}; client ids are "
                                         "ints >= 0 or str")
            ids.append(str(client))
        self.clients = frozenset(ids)

    def targets(self, client: Union[int, str]) -> bool:
        """Whether ``client`` is malicious."""
        return str(client) in self.clients

    def apply_(self, tensors: List[torch.Tensor], start: List[torch.Tensor], generator: torch.Generator) -> None:
        """Replace the trained ``tensors`` (in place) with what the malicious client sends;
        ``start`` holds the global model they were trained from, in the same order."""
        with torch.no_grad():
            for tensor, origin in zip(tensors, start):
                if tensor.is_floating_point():
                    tensor.copy_(self._attacked(tensor.detach(), origin, generator))

    def _attacked(self, trained: torch.Tensor, start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "clients")
        return f"{type(self).__name__}(clients={sorted(self.clients)}{', ' + fields if fields else ''})"


class SignFlip(Attack):
    """Send ``x - scale * (y - x)``: the honest update negated, times ``scale`` (> 0)."""

    def __init__(self, clients: Iterable[Union[int, str]], scale: float = 1.0) -> None:
        super().__init__(clients)
        self.scale = check_number(scale, "SignFlip(scale=...)", 0.0, strict=True)

    def _attacked(self, trained: torch.Tensor, start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return start - (trained - start) * self.scale


class ScaledUpdate(Attack):
    """Send ``x + factor * (y - x)``: the update boosted by ``factor`` (> 0)."""

    def __init__(self, clients: Iterable[Union[int, str]], factor: float = 10.0) -> None:
        super().__init__(clients)
        self.factor = check_number(factor, "ScaledUpdate(factor=...)", 0.0, strict=True)

    def _attacked(self, trained: torch.Tensor, start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return start + (trained - start) * self.factor


class GaussianUpdate(Attack):
    """Send ``x + N(0, std^2)``: a random update instead of the trained one (``std`` > 0)."""

    def __init__(self, clients: Iterable[Union[int, str]], std: float = 1.0) -> None:
        super().__init__(clients)
        self.std = check_number(std, "GaussianUpdate(std=...)", 0.0, strict=True)

    def _attacked(self, trained: torch.Tensor, start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(start.shape, generator=generator, dtype=start.dtype)
        return start + noise * self.std
