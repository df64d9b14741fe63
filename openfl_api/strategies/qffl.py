"""q-FFL / q-FedAvg (Li et al., "Fair Resource Allocation in Federated Learning", ICLR 2020,
arXiv:1905.10497): clients with a larger loss weigh more, so accuracy is spread more evenly.

Each client reports ``F_k``, the loss of the *downloaded* model on its training data before it
trains (``extra/qffl/loss``, a float64 scalar), and uploads its trained model ``y_k``. With
``L = 1 / lr`` (``lr`` the clients' learning rate) the backend computes, per client::

    dw_k    = L * (x - y_k)
    delta_k = F_k^q * dw_k
    h_k     = q * F_k^(q - 1) * ||dw_k||^2 + L * F_k^q

and moves ``x = x - sum_k delta_k / sum_k h_k``. ``q = 0`` gives the plain mean of the models.
``1e-10`` is added to ``F_k`` before the powers, as in the authors' code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Dict, List, Optional

import torch

from openfl_api.aggregate.updates import UpdateAggregator
from openfl_api.errors import ConfigurationError
from openfl_api.strategies._common import check_number

__all__ = ["QFedAvg", "QFFLClient", "LOSS"]

#: The upload extra that carries a client's loss before training.
LOSS = "extra/qffl/loss"
EPSILON = 1e-10


class QFedAvg(UpdateAggregator):
    """q-FedAvg's backend.

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        q: the fairness exponent, >= 0 (0 is the plain mean; the paper uses 0.001 to 5).
        lr: the clients' learning rate, > 0 (``L = 1 / lr`` estimates the loss's Lipschitz constant).

    Raises:
        ConfigurationError: an argument is out of range.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, q: float, lr: float) -> None:
        super().__init__(params, weighted=False)
        self.q = check_number(q, "QFedAvg(q=...)")
        self.lr = check_number(lr, "QFedAvg(lr=...)", 0.0, strict=True)
        self._h: List[float] = []

    def extra_layout(self):
        return {}, {LOSS: (torch.float64, ())}

    def _record(self, tensors: Mapping[str, torch.Tensor], num_samples: int, weight: float,
                peak: Optional[float], context: Optional[Mapping[str, Any]]) -> None:
        if LOSS not in tensors:
            raise ConfigurationError(f"the upload lacks {LOSS!r}: make a QFFLClient with the loss before api.upload()")
        loss = float(tensors[LOSS])
        if not math.isfinite(loss) or loss < 0:
            raise ConfigurationError(f"{LOSS} must be a finite loss >= 0, got {loss}")
        version = int(context["version"]) if context is not None else -1
        reference = self._reference(version)
        scale = 1.0 / self.lr
        squared = math.fsum(float(((reference[n].double() - tensors[n].detach().double()) ** 2).sum())
                            for n in self.param_names) * scale * scale
        f = loss + EPSILON
        self._h.append(weight * (self.q * f ** (self.q - 1) * squared + scale * f ** self.q))
        super()._record(tensors, num_samples, weight * f ** self.q, peak, context)

    def _compute(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        scale = 1.0 / self.lr
        total_h = math.fsum(self._h)
        reference = self._reference_sum(current)
        gradient = {n: (reference[n] - self._sum_of(n, torch.float64)) * (scale / total_h) for n in self.param_names}
        return self._step_params(current, gradient)

    def reset(self) -> None:
        super().reset()
        self._h = []

    def server_state(self) -> Dict[str, Any]:
        return {"h": list(self._h)}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self._h = [float(h) for h in state["h"]]

    def client(self, loss: float) -> "QFFLClient":
        """Frontend: stage this client's loss before training for the next upload."""
        return QFFLClient(self, loss)

    def __repr__(self) -> str:
        return f"QFedAvg(q={self.q:g}, lr={self.lr:g})"


class QFFLClient:
    """Stages one client's loss before training, ``F_k``, for its next upload::

        with torch.no_grad():
            loss = loss_fn(net(x_train), y_train).item()    # the downloaded model, before training
        qffl.client(loss)
        ... train ...
        api.upload(...)

    Raises:
        ConfigurationError: ``loss`` is not a finite number >= 0.
    """

    def __init__(self, aggregator: QFedAvg, loss: float) -> None:
        if not isinstance(aggregator, QFedAvg):
            raise ConfigurationError(f"QFFLClient needs the QFedAvg aggregator, got {type(aggregator).__name__}")
        if isinstance(loss, torch.Tensor):
            loss = loss.item()
        self.loss = check_number(loss, "QFFLClient(loss=...)")
        aggregator.stage({LOSS: torch.tensor(self.loss, dtype=torch.float64)})
