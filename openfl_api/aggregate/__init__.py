"""Aggregation of uploads on the backend: FedAvg, the plain mean, Elastic Aggregation, and the
staleness weighting and mixing of asynchronous FL (FedAsync, FedBuff).

The classes hold the running state (one sum buffer per entry, reused across rounds); the
formulas live as pure functions in :mod:`openfl_api.aggregate.functional`.
"""

from __future__ import annotations

from openfl_api.aggregate.average import AverageAggregator, NaiveAggregator
from openfl_api.aggregate.base import Aggregator
from openfl_api.aggregate.elastic import ElasticAggregator
from openfl_api.aggregate.exact import ExactSum
from openfl_api.aggregate.functional import (
    accumulation_dtype,
    elastic_update,
    finish_mean,
    mix,
    momentum_update_,
    normalized_sensitivity,
)
from openfl_api.aggregate.staleness import Constant, Hinge, Polynomial, Staleness, constant, hinge, polynomial

__all__ = [
    "Aggregator",
    "AverageAggregator",
    "NaiveAggregator",
    "ElasticAggregator",
    "ExactSum",
    "accumulation_dtype",
    "elastic_update",
    "finish_mean",
    "mix",
    "momentum_update_",
    "normalized_sensitivity",
    "Staleness",
    "Constant",
    "Polynomial",
    "Hinge",
    "constant",
    "polynomial",
    "hinge",
]
