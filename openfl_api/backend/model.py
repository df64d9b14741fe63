"""The backend's global model: the served tensors, the exchanged optimizer state, the server
optimizer, and the encoding of the current version that every download is served from."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from openfl_api.aggregate.functional import mix
from openfl_api.errors import ConfigurationError
from openfl_api.payload import encode, split
from openfl_api.state import SharedState
from openfl_api.transport.base import Pieces

__all__ = ["GlobalModel"]


class GlobalModel:
    """The global model of one backend.

    Args:
        state: the tensors the API exchanges (``set_state_dict``) and their schemas.
        server_optimizer: an optimizer over the global model that applies ``global - aggregate``
            as a gradient (FedOpt), or None: the aggregate replaces the global model.
        sender: the backend's name, written into every download's header.
    """

    def __init__(self, state: SharedState, server_optimizer: Optional[torch.optim.Optimizer], sender: str) -> None:
        if state.aggregator is None:
            raise ConfigurationError("the backend needs an aggregator: call set_aggregator_and_optimizer(...) before run()")
        self.state = state
        self.server_optimizer = server_optimizer
        self.sender = sender
        self.optim_state: Dict[str, torch.Tensor] = state.initial_optim_state()
        self._cache: Optional[Tuple[int, bytes, Pieces]] = None

    @property
    def aggregator(self) -> Any:
        return self.state.aggregator

    def encoded(self, version: int) -> Tuple[bytes, Pieces]:
        """The header and pieces of a download of ``version``, encoded once per version."""
        if self._cache is None or self._cache[0] != version:
            header, buffer = encode(self.state.download_tensors(self.optim_state), self.state.download_schema,
                                    kind="model", version=version, sender=self.sender)
            self._cache = (version, header, split(buffer))
        return self._cache[1], self._cache[2]

    def current(self) -> Dict[str, torch.Tensor]:
        """The global model's tensors, detached."""
        return {n: t.detach() for n, t in self.state.model.items()}

    def step(self, new: Dict[str, torch.Tensor], alpha: Optional[float]) -> None:
        """Make ``new`` (the aggregate) the next global model, in place.

        Args:
            new: the aggregator's result, one tensor per served entry.
            alpha: asynchronous mode: mix ``new`` into the current model with this weight;
                None replaces it (synchronous mode).
        """
        model = self.state.model
        if alpha is not None:
            current = self.current()
            for name, value in new.items():
                new[name] = mix(current[name] if name in current else self.optim_state[name], value, alpha)
        with torch.no_grad():
            rest = list(model)
            if self.server_optimizer is not None:
                self.server_optimizer.zero_grad(set_to_none=False)
                for name, param in self.state.params.items():
                    param.grad = (param.detach() - new[name]).to(param.dtype)
                self.server_optimizer.step()
                rest = [n for n in model if n not in self.state.params]
            for name in rest:
                model[name].copy_(new[name])
            for wire, tensor in self.optim_state.items():
                tensor.copy_(new[wire])
        self._cache = None

    def state_dict(self) -> Dict[str, Any]:
        """The global model, the exchanged optimizer state and the server optimizer, as copies."""
        return {
            "state_dict": {n: t.detach().clone() for n, t in self.state.model.items()},
            "optim_state": {n: t.clone() for n, t in self.optim_state.items()},
            "server_optimizer": None if self.server_optimizer is None else self.server_optimizer.state_dict(),
        }

    def load_state_dict(self, data: Mapping[str, Any], source: str) -> None:
        """Load what :meth:`state_dict` returned, after checking that it fits this model.

        Raises:
            ConfigurationError: names, shapes or dtypes differ, or the server optimizer does not fit.
        """
        model = self.state.model
        saved = data["state_dict"]
        differences = describe_differences(
            {n: (t.dtype, tuple(t.shape)) for n, t in saved.items()},
            {n: (t.dtype, tuple(t.shape)) for n, t in model.items()},
            "the checkpoint", "this backend",
        )
        if differences:
            raise ConfigurationError(f"{source} holds a model that does not match this state_dict: {differences}; "
                                     "resume with the same model definition")
        if set(data["optim_state"]) != set(self.optim_state):
            raise ConfigurationError(f"{source} holds optimizer state {sorted(data['optim_state'])[:4]}; "
                                     f"this backend exchanges {sorted(self.optim_state)[:4]}")
        if (data["server_optimizer"] is None) != (self.server_optimizer is None):
            raise ConfigurationError(f"{source} was written {'with' if data['server_optimizer'] is not None else 'without'} "
                                     "a server optimizer; resume with the same set_aggregator_and_optimizer(...)")
        with torch.no_grad():
            for name, tensor in model.items():
                tensor.copy_(saved[name])
            for name, tensor in self.optim_state.items():
                tensor.copy_(data["optim_state"][name])
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(data["server_optimizer"])
        self._cache = None


def describe_differences(theirs: Mapping[str, Tuple[Any, Tuple[int, ...]]],
                         ours: Mapping[str, Tuple[Any, Tuple[int, ...]]], their_name: str, our_name: str,
                         limit: int = 4) -> str:
    """Name the first entries that differ between two ``name -> (dtype, shape)`` layouts; ``""`` if none.

    Example: ``"missing in the frontend's model: fc2.weight, fc2.bias; shapes differ: fc1.weight is
    (6, 12) in this backend and (4, 12) in the frontend's model"``.
    """
    parts = []
    missing = [n for n in ours if n not in theirs]
    extra = [n for n in theirs if n not in ours]
    if missing:
        parts.append(f"missing in {their_name}: {_first(missing, limit)}")
    if extra:
        parts.append(f"not in {our_name}: {_first(extra, limit)}")
    shapes = [n for n in ours if n in theirs and tuple(theirs[n][1]) != tuple(ours[n][1])]
    if shapes:
        parts.append("shapes differ: " + "; ".join(
            f"{n} is {tuple(ours[n][1])} in {our_name} and {tuple(theirs[n][1])} in {their_name}" for n in shapes[:limit]))
    dtypes = [n for n in ours if n in theirs and str(theirs[n][0]) != str(ours[n][0])]
    if dtypes:
        parts.append("dtypes differ: " + "; ".join(
            f"{n} is {ours[n][0]} in {our_name} and {theirs[n][0]} in {their_name}" for n in dtypes[:limit]))
    if not parts and list(theirs) != list(ours):
        parts.append(f"the same entries in another order (first at {_first_out_of_order(theirs, ours)})")
    return "; ".join(parts)


def _first(names: list, limit: int) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _first_out_of_order(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    for a, b in zip(theirs, ours):
        if a != b:
            return b
    return "the end"
