"""Aggregation of uploads on the backend: FedAvg, the plain mean, Elastic Aggregation, the
staleness weighting and mixing of asynchronous FL (FedAsync, FedBuff), server optimizers on the
pseudo-gradient (FedAvgM, FedAdagrad, FedAdam, FedYogi), norm clipping of updates, and robust
rules (Median, TrimmedMean, Krum, Multi-Krum, Bulyan).

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
from openfl_api.aggregate.partial import PartialSums
from openfl_api.aggregate.robust import Bulyan, Krum, Median, MultiKrum, RobustAggregator, TrimmedMean
from openfl_api.aggregate.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from openfl_api.aggregate.staleness import Constant, Hinge, Polynomial, Staleness, constant, hinge, polynomial
from openfl_api.aggregate.updates import Mean, UpdateAggregator

__all__ = [
    "Aggregator",
    "AverageAggregator",
    "NaiveAggregator",
    "ElasticAggregator",
    "ExactSum",
    "PartialSums",
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
    "UpdateAggregator",
    "Mean",
    "ServerOptimizer",
    "FedAvgM",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "RobustAggregator",
    "Median",
    "TrimmedMean",
    "Krum",
    "MultiKrum",
    "Bulyan",
]
