"""Elastic Aggregation (Chen et al., CVPR 2023): FedAvg with a per-parameter step size."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch

from openfl_api.aggregate.average import AverageAggregator
from openfl_api.aggregate.functional import accumulation_dtype, elastic_update, momentum_update_
from openfl_api.errors import ConfigurationError

__all__ = ["ElasticAggregator"]


class ElasticAggregator(AverageAggregator):
    """Aggregates with Elastic Aggregation: parameters the model's output is sensitive to move less.

    From D. Chen, J. Hu, V. J. Tan, X. Wei and E. Wu, "Elastic Aggregation for Federated
    Optimization", CVPR 2023, pp. 12187-12197. Each frontend tracks, while it trains, the
    sensitivity of every parameter ``theta``::

        Omega = momentum * Omega + (1 - momentum) * |d(||output||_2^2) / d(theta)|

    and uploads it as ``extra/sensitivity/{param_name}``. The backend averages everything with
    FedAvg weights ``num_samples * weight``; buffers and optimizer state take that average, and
    each parameter tensor takes the elastic step::

        zeta = Omega_avg / max(Omega_avg)        (per tensor; 0 where the max is 0)
        new  = current - (1 + tau - zeta) * (current - theta_avg)

    so the most sensitive entries move by ``tau`` of the FedAvg update, insensitive ones by up
    to ``1 + tau`` of it. With ``tau = 0`` and uniform sensitivity nothing moves; with ``tau = 0``
    and zero sensitivity (never tracked) the step is FedAvg.

    Frontends call :meth:`track` on the model output of each training step, then attach
    :meth:`frontend_extras` to the upload.
    """

    upload_keys = ("sensitivity",)

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        tau: float = 0.5,
        momentum: float = 0.9,
        state_keys: Sequence[str] = (),
    ) -> None:
        """Creates an Elastic aggregator for ``params``.

        Args:
            params: the model's parameters, e.g. ``net.parameters()``, in ``state_dict`` order.
            tau: how far beyond the FedAvg step the least sensitive entries go, in ``[0, 1]``.
            momentum: decay of the running sensitivity, in ``[0, 1)``.
            state_keys: optimizer-state keys per parameter to aggregate along with the model.

        Raises:
            ConfigurationError: an argument is out of range; see also :class:`Aggregator`.
        """
        super().__init__(params, state_keys)
        if not _is_number(tau) or not 0 <= tau <= 1:
            raise ConfigurationError(f"tau must be a number in [0, 1]; got {tau!r}")
        if not _is_number(momentum) or not 0 <= momentum < 1:
            raise ConfigurationError(
                f"momentum must be a number in [0, 1) (1 would never update); got {momentum!r}"
            )
        self.tau = float(tau)
        self.momentum = float(momentum)
        self._sensitivities: list[torch.Tensor | None] = [None] * len(self._params)

    def track(self, output: torch.Tensor) -> None:
        """Folds the sensitivity of every parameter to ``output`` into the running sensitivity.

        Call it on the model output of a training step, before ``backward()``. It differentiates
        ``||output||_2^2`` with :func:`torch.autograd.grad` and ``retain_graph=True``, so the
        parameters' ``.grad`` stay untouched and the graph is still there for ``backward()``.
        Parameters the output does not depend on, or that do not require grad, count as
        sensitivity 0.

        Raises:
            ConfigurationError: ``output`` is not a tensor that requires grad.
        """
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise ConfigurationError(
                "track() needs the model output of a training step, a tensor that requires grad; "
                "call it before backward() and outside torch.no_grad()"
            )
        indices = [i for i, param in enumerate(self._params) if param.requires_grad]
        with torch.enable_grad():
            squared_norm = output.pow(2).sum()
        grads = (
            torch.autograd.grad(
                squared_norm,
                [self._params[i] for i in indices],
                retain_graph=True,
                allow_unused=True,
            )
            if indices
            else ()
        )
        by_index = dict(zip(indices, grads))
        with torch.no_grad():
            for i in range(len(self._params)):
                running = self._running_sensitivity(i)
                grad = by_index.get(i)
                if grad is None:
                    running.mul_(self.momentum)
                else:
                    momentum_update_(running, grad, self.momentum)

    def frontend_extras(self) -> dict[str, torch.Tensor]:
        """Returns the sensitivities tracked so far as ``extra/sensitivity/{name}``, and restarts.

        A parameter never tracked since the last call gets zeros. The returned tensors are handed
        over: the next :meth:`track` starts new ones from zero.

        Raises:
            ConfigurationError: :meth:`bind` was not called yet.
        """
        extras = {
            f"extra/sensitivity/{name}": self._running_sensitivity(i)
            for i, name in enumerate(self.param_names)
        }
        self._sensitivities = [None] * len(self._params)
        return extras

    def _finish(self, name: str, current: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Returns the elastic step for parameters and the weighted mean for every other entry."""
        if name not in self._param_set:
            return super()._finish(name, current)
        total = self.total_weight
        average = self._values[name] / total
        sensitivity = self._values[f"extra/sensitivity/{name}"] / total
        start = current[name].detach().to(device=average.device, dtype=average.dtype)
        return elastic_update(start, average, sensitivity, self.tau).to(current[name].dtype)

    def _running_sensitivity(self, index: int) -> torch.Tensor:
        """Returns parameter ``index``'s running sensitivity, made as zeros on first use."""
        running = self._sensitivities[index]
        if running is None:
            param = self._params[index]
            running = torch.zeros(
                param.shape, dtype=accumulation_dtype(param.dtype), device=param.device
            )
            self._sensitivities[index] = running
        return running


def _is_number(value: object) -> bool:
    """Tells whether ``value`` is a finite real number other than a bool."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
