"""The backend's global model: the served tensors, the exchanged optimizer state, the server
optimizer, and the encoding of the current version that every download is served from."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from openfl_api.aggregate.functional import mix
from openfl_api.errors import ConfigurationError
from openfl_api.payload import describe_differences, encode, on_cuda, split
from openfl_api.buffers import Spares
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
        self._buffer: Optional[torch.Tensor] = None  # the buffer the cached encoding lies in
        self._spares = Spares()  # buffers of earlier versions, written again once no download holds them

    @property
    def aggregator(self) -> Any:
        return self.state.aggregator

    def encoded(self, version: int) -> Tuple[bytes, Pieces]:
        """The header and pieces of a download of ``version``, encoded once per version."""
        if self._cache is None or self._cache[0] != version:
            self._forget()
            schema, tensors = self.state.download_schema, self.state.download_tensors(self.optim_state)
            spare = self._spares.take(schema, schema.nbytes, on_cuda(tensors.values()))
            header, buffer = encode(tensors, schema, kind="model", version=version, sender=self.sender, out=spare,
                                    keep_views=False)
            self._cache, self._buffer = (version, header, split(buffer)), buffer
        return self._cache[1], self._cache[2]

    def _forget(self) -> None:
        """Drop the encoding of the current version: its buffer is retired, to be written again
        for a later version once no download of this one holds it."""
        if self._buffer is not None:
            self._spares.give(self.state.download_schema, self._buffer)
        self._cache = self._buffer = None

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
        self._forget()

    def replace(self, values: Mapping[str, torch.Tensor]) -> None:
        """Copy ``values`` into the served tensors, one for every entry of the served state_dict;
        the next download is encoded from them.

        Raises:
            ConfigurationError: ``values`` misses an entry.
        """
        model = self.state.model
        missing = [name for name in model if name not in values]
        if missing:
            raise ConfigurationError(f"replacing the global model needs a tensor for every entry of its state_dict; "
                                     f"{missing[:4]} are missing")
        with torch.no_grad():
            for name, tensor in model.items():
                tensor.copy_(values[name])
        self._forget()

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
        self._forget()
