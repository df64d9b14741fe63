"""Mean aggregators: FedAvg and the plain, unweighted mean."""

from __future__ import annotations

from openfl_api.aggregate.base import Aggregator

__all__ = ["AverageAggregator", "NaiveAggregator"]


class AverageAggregator(Aggregator):
    """Averages every entry weighted by ``num_samples * weight`` (FedAvg, McMahan et al., 2017).

    The new global value of each entry is ``sum_k w_k x_k / sum_k w_k`` with
    ``w_k = num_samples_k * weight_k``; integer entries are rounded to the nearest integer and bool
    entries become ``mean >= 0.5``.
    """

    def effective_weight(self, num_samples: int, weight: float) -> float:
        """Returns ``num_samples * weight``."""
        return num_samples * weight


class NaiveAggregator(Aggregator):
    """Averages every entry weighted by ``weight`` alone, ignoring ``num_samples``.

    With the default ``weight=1.0`` this is the plain mean of the uploads.
    """

    def effective_weight(self, num_samples: int, weight: float) -> float:
        """Returns ``weight``."""
        return weight
