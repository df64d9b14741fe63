"""Aggregation of uploads on the backend: FedAvg, the plain mean and Elastic Aggregation.

The classes hold the running state (one sum buffer per entry, reused across rounds); the
formulas live as pure functions in :mod:`openfl_api.aggregate.functional`.
"""

from __future__ import annotations

from openfl_api.aggregate.average import AverageAggregator, NaiveAggregator
from openfl_api.aggregate.base import Aggregator
from openfl_api.aggregate.elastic import ElasticAggregator
from openfl_api.aggregate.functional import (
    accumulate_,
    accumulation_dtype,
    elastic_update,
    finish_mean,
    momentum_update_,
    normalized_sensitivity,
)

__all__ = [
    "Aggregator",
    "AverageAggregator",
    "NaiveAggregator",
    "ElasticAggregator",
    "accumulate_",
    "accumulation_dtype",
    "elastic_update",
    "finish_mean",
    "momentum_update_",
    "normalized_sensitivity",
]
