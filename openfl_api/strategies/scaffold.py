"""SCAFFOLD (Karimireddy et al., ICML 2020, arXiv:1910.06378): control variates correct the drift
of local training.

The backend keeps ``c``; each client keeps its own ``c_i`` between rounds. Downloads carry ``c``
beside the model (``extra/scaffold/c/<param>``); each local step uses the gradient ``g - c_i + c``;
after ``K`` steps with learning rate ``lr`` the client sets (option II of the paper)::

    c_i+ = c_i - c + (x - y) / (K * lr)          and uploads y and  dc_i = c_i+ - c_i

(``extra/scaffold/dc/<param>``). The backend averages the models with equal weights and moves
``c = c + (1 / N) * sum_i dc_i`` over the ``N`` clients (``num_clients``). With the server learning
rate ``lr = 1`` and zero control variates (the first round) this is FedAvg with equal weights, bit
for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Dict, Optional

import torch

from openfl_api.aggregate.server_opt import FedAvgM, ServerOptimizer
from openfl_api.aggregate.updates import UpdateAggregator
from openfl_api.errors import ConfigurationError
from openfl_api.strategies._common import check_number, check_version, next_state, start_value

__all__ = ["Scaffold", "ScaffoldClient"]

C = "extra/scaffold/c/"
DC = "extra/scaffold/dc/"


class Scaffold(UpdateAggregator):
    """SCAFFOLD's backend: averages the models (server learning rate ``lr``) and keeps ``c``.

    Build it on every rank (one script runs everywhere); frontends make their
    :class:`ScaffoldClient` with :meth:`client`.

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        num_clients: ``N``, the clients of the federation; None takes the uploads of each version
            (full participation).
        lr: the server learning rate, > 0 (1 in the paper's experiments).
        weighted: weight the models by ``num_samples`` (the paper weighs equally).
        server: another server optimizer for the model instead of ``lr`` (e.g. ``FedAdam``).
        max_norm: clip each model update's norm to this value; None does not clip.

    Raises:
        ConfigurationError: an argument is out of range.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, num_clients: Optional[int] = None, lr: float = 1.0,
                 weighted: bool = False, server: Optional[ServerOptimizer] = None,
                 max_norm: Optional[float] = None) -> None:
        lr = check_number(lr, "Scaffold(lr=...)", 0.0, strict=True)
        if server is not None and lr != 1.0:
            raise ConfigurationError("Scaffold takes either lr=... or server=...; give the learning rate to the "
                                     "server optimizer")
        if num_clients is not None and (isinstance(num_clients, bool) or not isinstance(num_clients, int)
                                        or num_clients < 1):
            raise ConfigurationError(f"Scaffold(num_clients=...) must be an int >= 1 or None, got {num_clients!r}")
        super().__init__(params, server=server if server is not None or lr == 1.0 else FedAvgM(lr=lr),
                         max_norm=max_norm, weighted=weighted)
        self.lr = lr
        self.num_clients = num_clients
        self._c: Dict[str, torch.Tensor] = {}

    def extra_layout(self):
        named = list(zip(self.param_names, self._params))
        return ({f"{C}{n}": (p.dtype, tuple(p.shape)) for n, p in named},
                {f"{DC}{n}": (p.dtype, tuple(p.shape)) for n, p in named})

    @property
    def c(self) -> Dict[str, torch.Tensor]:
        """Backend: the server control variate per parameter (float64; zeros at first)."""
        for name, param in zip(self.param_names, self._params):
            if name not in self._c:
                self._c[name] = torch.zeros(param.shape, dtype=torch.float64)
        return self._c

    def download_extras(self) -> Dict[str, torch.Tensor]:
        return {f"{C}{n}": self.c[n].to(p.dtype) for n, p in zip(self.param_names, self._params)}

    def _compute(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        result = super()._compute(current)
        participants = self.num_clients if self.num_clients is not None else self.count
        share = self.count / participants / self.total_weight
        for name in self.param_names:
            self.c[name] = self.c[name] + self._sum_of(f"{DC}{name}", torch.float64) * share
        return result

    def server_state(self) -> Dict[str, Any]:
        return {"c": {n: t.clone() for n, t in self.c.items()}}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self._c = {n: t.clone() for n, t in state["c"].items()}

    def client(self, lr: float, state: Optional[Mapping[str, Any]] = None, version: int = 0) -> "ScaffoldClient":
        """Frontend: the helper for one client's local training of the version just downloaded.

        Args:
            lr: the local learning rate (option II divides by ``K * lr``).
            state: this client's state from its last :meth:`ScaffoldClient.finish`, or None at first.
            version: the version trained from (``api.version``, or ``client.version``).
        """
        return ScaffoldClient(self, lr, state, version)

    def __repr__(self) -> str:
        return f"Scaffold(num_clients={self.num_clients}, lr={self.lr:g})"


class ScaffoldClient:
    """One client's SCAFFOLD step for one version, inside the user's loop::

        local = scaffold.client(lr=0.05, state=state, version=api.version)
        for x, y in batches:
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            local.correct_()                 # grad += c - c_i
            optimizer.step()
        state = local.finish()               # stages dc_i for api.upload()

    Built right after the download, while the model holds the global model ``x``. Option II of the
    paper assumes plain SGD with a constant learning rate.
    """

    def __init__(self, aggregator: Scaffold, lr: float, state: Optional[Mapping[str, Any]], version: int) -> None:
        if not isinstance(aggregator, Scaffold):
            raise ConfigurationError(f"ScaffoldClient needs the Scaffold aggregator, got {type(aggregator).__name__}")
        self.aggregator = aggregator
        self.lr = check_number(lr, "ScaffoldClient(lr=...)", 0.0, strict=True)
        self.version = check_version(version, "ScaffoldClient(version=...)")
        names = aggregator.param_names
        self.params = aggregator.params
        self.c = [aggregator.received(f"{C}{n}") for n in names]
        self.c_i = start_value(state, self.version, lambda: [torch.zeros_like(p.detach()) for p in self.params],
                               "ScaffoldClient(state=...)")
        self.start = [p.detach().clone() for p in self.params]
        self.correction = [c - c_i for c, c_i in zip(self.c, self.c_i)]
        self._zero = all(not bool(t.any()) for t in self.correction)
        self.steps = 0

    def correct_(self) -> None:
        """Add ``c - c_i`` to every parameter's gradient; counts one local step."""
        self.steps += 1
        if self._zero:
            return
        with torch.no_grad():
            for param, term in zip(self.params, self.correction):
                if param.grad is None:
                    param.grad = term.clone()
                else:
                    param.grad.add_(term)

    def finish(self) -> Dict[str, Any]:
        """Computes ``c_i+`` from the ``K`` counted steps, stages ``dc_i = c_i+ - c_i`` for the
        upload, and returns this client's new state (keep it for its next round).

        Raises:
            ConfigurationError: no step was counted (``correct_()`` was never called).
        """
        if self.steps == 0:
            raise ConfigurationError("ScaffoldClient.finish() needs the number of local steps: call correct_() "
                                     "after each backward(), before optimizer.step()")
        scale = 1.0 / (self.steps * self.lr)
        with torch.no_grad():
            new = [c_i - c + (x - p.detach()) * scale for c_i, c, x, p in zip(self.c_i, self.c, self.start, self.params)]
            self.aggregator.stage({f"{DC}{n}": (plus - c_i) for n, plus, c_i in
                                   zip(self.aggregator.param_names, new, self.c_i)})
        return next_state(self.version, new, self.c_i)
