"""Server optimizers: FedAvgM, FedAdagrad, FedAdam and FedYogi on the pseudo-gradient.

Each version the backend forms the *pseudo-gradient* of every parameter,
``g = reference - aggregate``: the global model the uploads were trained from minus what they
aggregate to (``x - mean y`` for FedAvg; in asynchronous mode the staleness-weighted mean of each
upload's own ``x_from - y``). A server optimizer turns ``g`` into the next global parameter. The
rules, all per coordinate, with ``delta = -g``:

- FedAvgM (Hsu et al., 2019, arXiv:1909.06335; PyTorch's SGD convention):
  ``b = momentum * b + g`` (``b = g`` the first time), ``x = x - lr * b``. ``lr`` is the server
  learning rate; ``FedAvgM(lr=1.0, momentum=0.0)`` is FedAvg.
- FedAdagrad, FedAdam, FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
  arXiv:2003.00295, Algorithm 2):
  ``m = beta1 * m + (1 - beta1) * delta`` and

  - Adagrad: ``v = v + delta**2``
  - Adam:    ``v = beta2 * v + (1 - beta2) * delta**2``
  - Yogi:    ``v = v - (1 - beta2) * delta**2 * sign(v - delta**2)``

  then ``x = x + lr * m / (sqrt(v) + tau)``. ``m`` starts at 0 and ``v`` at ``initial_v``; the
  paper asks for ``initial_v >= tau**2``, Flower starts at 0 (the default here). There is no bias
  correction unless ``FedAdam(bias_correction=True)``, which scales the step by
  ``sqrt(1 - beta2**t) / (1 - beta1**t)`` at the ``t``-th server step (Kingma and Ba's).

The update rules are pure functions (:func:`fedavgm_step`, :func:`fedopt_step`); the classes keep
their state per parameter (float64) and give it to checkpoints.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from openfl_api.errors import ConfigurationError

__all__ = [
    "ServerOptimizer",
    "FedAvgM",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "fedavgm_step",
    "fedopt_step",
]


def fedavgm_step(x: torch.Tensor, g: torch.Tensor, buffer: Optional[torch.Tensor], lr: float,
                 momentum: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One FedAvgM step: returns ``(x - lr * b, b)`` with ``b = momentum * buffer + g`` (``g`` when
    ``buffer`` is None). Nothing is changed in place."""
    b = g.clone() if buffer is None else buffer * momentum + g
    return x - lr * b, b


def fedopt_step(rule: str, x: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float,
                beta1: float, beta2: float, tau: float, t: int = 1,
                bias_correction: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of FedAdagrad, FedAdam or FedYogi (Reddi et al., Algorithm 2) on pseudo-gradient ``g``.

    Args:
        rule: ``"adagrad"``, ``"adam"`` or ``"yogi"``.
        x, g, m, v: the parameter, its pseudo-gradient and the two moments before this step.
        lr, beta1, beta2, tau: the server learning rate, the moments' decays and the adaptivity.
        t: the number of this step, from 1 (used by the bias correction only).
        bias_correction: scale the step by ``sqrt(1 - beta2**t) / (1 - beta1**t)``.

    Returns:
        ``(x, m, v)`` after the step, fresh tensors.
    """
    delta = -g
    m = beta1 * m + (1 - beta1) * delta
    square = delta * delta
    if rule == "adagrad":
        v = v + square
    elif rule == "adam":
        v = beta2 * v + (1 - beta2) * square
    elif rule == "yogi":
        v = v - (1 - beta2) * square * torch.sign(v - square)
    else:
        raise ConfigurationError(f"rule must be 'adagrad', 'adam' or 'yogi', got {rule!r}")
    step = lr
    if bias_correction:
        step = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
    return x + step * m / (v.sqrt() + tau), m, v


def _number(value: Any, what: str, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigurationError(f"{what} must be a finite number, got {value!r}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise ConfigurationError(f"{what} must be in {interval}, got {value!r}")
    return value


class ServerOptimizer:
    """Turns the pseudo-gradients of one version into the next global parameters.

    An aggregator given ``server=`` calls :meth:`step` once per aggregation with every parameter.
    Subclasses implement :meth:`_step` for one parameter and keep their state in ``self.state``
    (parameter name -> dict of float64 tensors).
    """

    def __init__(self) -> None:
        self.state: Dict[str, Dict[str, torch.Tensor]] = {}
        self.steps = 0

    def step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns the new value of every parameter (float64) from its current value and pseudo-gradient.

        Args:
            params: parameter name -> its value now, float64.
            grads: parameter name -> its pseudo-gradient ``reference - aggregate``, float64.
        """
        self.steps += 1
        return {name: self._step(name, params[name], grads[name]) for name in params}

    def _step(self, name: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """The moments per parameter and the number of steps taken (tensors and ints only)."""
        return {"steps": self.steps, "state": {n: {k: t.clone() for k, t in s.items()} for n, s in self.state.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned.

        Raises:
            ConfigurationError: ``state`` does not have that structure.
        """
        if not isinstance(state, Mapping) or set(state) != {"steps", "state"}:
            raise ConfigurationError(f"a {type(self).__name__} state must have the keys ['state', 'steps'] "
                                     "that state_dict() returns")
        self.steps = int(state["steps"])
        self.state = {str(n): {str(k): t.clone() for k, t in s.items()} for n, s in state["state"].items()}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("state", "steps"))
        return f"{type(self).__name__}({fields})"


class FedAvgM(ServerOptimizer):
    """Server SGD with momentum on the pseudo-gradient (FedAvgM; plain server SGD with ``momentum=0``).

    Args:
        lr: the server learning rate, > 0. ``lr=1.0, momentum=0.0`` gives the FedAvg step.
        momentum: in ``[0, 1)``.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        super().__init__()
        self.lr = _number(lr, "FedAvgM(lr=...)", 0.0, low_open=True)
        self.momentum = _number(momentum, "FedAvgM(momentum=...)", 0.0, 1.0, high_open=True)

    def _step(self, name: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.momentum == 0.0:
            return x - self.lr * g
        state = self.state.get(name)
        new, buffer = fedavgm_step(x, g, None if state is None else state["momentum_buffer"], self.lr, self.momentum)
        self.state[name] = {"momentum_buffer": buffer}
        return new


class _FedOpt(ServerOptimizer):
    rule = ""

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float, initial_v: float) -> None:
        super().__init__()
        label = type(self).__name__
        self.lr = _number(lr, f"{label}(lr=...)", 0.0, low_open=True)
        self.beta1 = _number(beta1, f"{label}(beta1=...)", 0.0, 1.0, high_open=True)
        self.beta2 = _number(beta2, f"{label}(beta2=...)", 0.0, 1.0, high_open=True)
        self.tau = _number(tau, f"{label}(tau=...)", 0.0, low_open=True)
        self.initial_v = _number(initial_v, f"{label}(initial_v=...)", 0.0)

    def _step(self, name: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        state = self.state.get(name)
        if state is None:
            state = {"m": torch.zeros_like(x), "v": torch.full_like(x, self.initial_v)}
        new, m, v = fedopt_step(self.rule, x, g, state["m"], state["v"], lr=self.lr, beta1=self.beta1,
                                beta2=self.beta2, tau=self.tau, t=self.steps,
                                bias_correction=getattr(self, "bias_correction", False))
        self.state[name] = {"m": m, "v": v}
        return new


class FedAdagrad(_FedOpt):
    """FedAdagrad (Reddi et al., 2021): ``v`` sums the squared pseudo-gradients.

    Args:
        lr: the server learning rate, > 0.
        tau: the adaptivity, > 0 (larger is closer to server SGD with step ``lr / tau``).
        beta1: the first moment's decay in ``[0, 1)``; Flower fixes it at 0 (the default).
        initial_v: the starting value of ``v``, >= 0 (the paper: ``>= tau**2``).
    """

    rule = "adagrad"

    def __init__(self, lr: float = 0.1, tau: float = 1e-3, beta1: float = 0.0, initial_v: float = 0.0) -> None:
        super().__init__(lr, beta1, 0.0, tau, initial_v)


class FedAdam(_FedOpt):
    """FedAdam (Reddi et al., 2021): Adam's moments on the pseudo-gradient.

    Args:
        lr: the server learning rate, > 0.
        beta1, beta2: the moments' decays, in ``[0, 1)``.
        tau: the adaptivity, > 0.
        initial_v: the starting value of ``v``, >= 0.
        bias_correction: scale each step by ``sqrt(1 - beta2**t) / (1 - beta1**t)`` (Kingma and Ba);
            the paper has none.
    """

    rule = "adam"

    def __init__(self, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 initial_v: float = 0.0, bias_correction: bool = False) -> None:
        super().__init__(lr, beta1, beta2, tau, initial_v)
        if not isinstance(bias_correction, bool):
            raise ConfigurationError(f"FedAdam(bias_correction=...) must be a bool, got {bias_correction!r}")
        self.bias_correction = bias_correction


class FedYogi(_FedOpt):
    """FedYogi (Reddi et al., 2021): Yogi's additive ``v``, which grows or shrinks by at most
    ``(1 - beta2) * delta**2`` per step.

    Args:
        lr: the server learning rate, > 0.
        beta1, beta2: the moments' decays, in ``[0, 1)``.
        tau: the adaptivity, > 0.
        initial_v: the starting value of ``v``, >= 0.
    """

    rule = "yogi"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 initial_v: float = 0.0) -> None:
        super().__init__(lr, beta1, beta2, tau, initial_v)
