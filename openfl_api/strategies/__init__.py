"""The algorithms FL papers compare against, as small objects in the user's own loop.

Each algorithm has a backend side (an aggregator, built on every rank like any other) and, where
the paper changes local training, a client-side helper used inside the user's loop:

- FedProx: :class:`FedProx` (client; the server is FedAvg);
- SCAFFOLD: :class:`Scaffold` and its :class:`ScaffoldClient` (control variates both ways);
- FedNova: :class:`FedNova` and its :class:`FedNovaClient` (normalised averaging);
- FedDyn: :class:`FedDyn` and its :class:`FedDynClient` (dynamic regularisation);
- q-FFL: :class:`QFedAvg` and its :class:`QFFLClient` (fair aggregation by loss);
- attacks for simulation: :class:`SignFlip`, :class:`ScaledUpdate`, :class:`GaussianUpdate`
  (``VirtualClients(..., attack=...)``);
- :class:`RoundConfig`: a step that serves a configuration (learning rate, ``mu``, ...) per version.

Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi), norm clipping and the robust rules
(Median, TrimmedMean, Krum, Multi-Krum, Bulyan) are aggregators in :mod:`openfl_api.aggregate`.
"""

from __future__ import annotations

from openfl_api.strategies.attacks import Attack, GaussianUpdate, ScaledUpdate, SignFlip
from openfl_api.strategies.config import RoundConfig
from openfl_api.strategies.feddyn import FedDyn, FedDynClient
from openfl_api.strategies.fednova import FedNova, FedNovaClient
from openfl_api.strategies.fedprox import FedProx
from openfl_api.strategies.qffl import QFedAvg, QFFLClient
from openfl_api.strategies.scaffold import Scaffold, ScaffoldClient

__all__ = [
    "FedProx",
    "Scaffold",
    "ScaffoldClient",
    "FedNova",
    "FedNovaClient",
    "FedDyn",
    "FedDynClient",
    "QFedAvg",
    "QFFLClient",
    "Attack",
    "SignFlip",
    "ScaledUpdate",
    "GaussianUpdate",
    "RoundConfig",
]
