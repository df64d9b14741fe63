"""Metrics per version: aggregated across clients without depending on arrival order, and kept.

Frontends report scalar metrics with each upload (training) and each evaluation; the backend
aggregates them per version into statistics: by default the ``mean`` weighted by the clients'
``num_samples``, the ``min`` and the ``max``. :class:`MetricRules` chooses other statistics per
metric, including functions of one's own::

    def spread(values, weights):        # values in client-id order, weights = num_samples
        return max(values) - min(values)

    rules = MetricRules(accuracy=("mean", "min", spread), loss=("mean",))

Every statistic is a function of the *set* of ``(client, num_samples, value)``: the values are
taken in client-id order and sums are :func:`math.fsum` (correctly rounded), so the result does
not depend on the order in which the reports arrived, nor on how many processes hosted the
clients. :class:`History` keeps what the record of a run holds per version, for the report table
and the progress line.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from prettytable import PrettyTable

from openfl_api.errors import ConfigurationError
from openfl_api.versions import client_order

__all__ = ["Result", "Summary", "MetricRules", "STATISTICS", "weighted_mean", "summarize", "History"]

Statistic = Union[str, Callable[[List[float], List[int]], float], Tuple[str, Callable[[List[float], List[int]], float]]]


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    """``sum(w * x) / sum(w)`` with each product rounded once and the sums correctly rounded."""
    return math.fsum(w * x for w, x in zip(weights, values)) / math.fsum(weights)


#: The built-in statistics: name -> ``f(values, weights)``; values and weights in client-id order.
STATISTICS: Dict[str, Callable[[List[float], List[int]], float]] = {
    "mean": weighted_mean,
    "min": lambda values, weights: min(values),
    "max": lambda values, weights: max(values),
    "sum": lambda values, weights: math.fsum(values),
    "median": lambda values, weights: float(statistics.median(values)),
}


@dataclass(frozen=True)
class Result:
    """One client's metrics: its id, the samples behind them, and the values."""

    client: str
    num_samples: int
    metrics: Mapping[str, float]


@dataclass
class Summary:
    """The aggregate of several clients' results.

    Attributes:
        clients: how many results went in.
        num_samples: their samples in all.
        metrics: metric -> statistic -> value (None when a value was not finite).
    """

    clients: int
    num_samples: int
    metrics: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)


class MetricRules:
    """Which statistics to compute for each metric.

    Args:
        default: the statistics of a metric not named below; names of :data:`STATISTICS`,
            functions ``f(values, weights) -> float`` (named by their ``__name__``), or
            ``(name, function)`` pairs.
        **per_metric: the statistics of one metric, in the same forms (a list or tuple of them, or
            one name or function).

    Raises:
        ConfigurationError: an unknown statistic name, a function without a usable name, an
            empty list, or two statistics of one metric with the same name.
    """

    def __init__(self, default: Sequence[Statistic] = ("mean", "min", "max"), **per_metric: Sequence[Statistic]) -> None:
        self.default = _check_statistics("default", default)
        self.per_metric = {name: _check_statistics(name, spec) for name, spec in per_metric.items()}

    def statistics(self, metric: str) -> List[Tuple[str, Callable[[List[float], List[int]], float]]]:
        """The ``(name, function)`` pairs to compute for ``metric``."""
        return self.per_metric.get(metric, self.default)

    def __repr__(self) -> str:
        named = ", ".join(f"{k}={[n for n, _ in v]}" for k, v in self.per_metric.items())
        return f"MetricRules(default={[n for n, _ in self.default]}{', ' + named if named else ''})"


def _check_statistics(metric: str, spec: Any) -> List[Tuple[str, Callable[[List[float], List[int]], float]]]:
    where = "MetricRules(default=...)" if metric == "default" else f"MetricRules({metric}=...)"
    if isinstance(spec, str) or callable(spec):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigurationError(f"{where} must list at least one statistic, e.g. ('mean', 'min', 'max'); got {spec!r}")
    found: List[Tuple[str, Callable[[List[float], List[int]], float]]] = []
    for item in spec:
        if isinstance(item, str):
            if item not in STATISTICS:
                raise ConfigurationError(f"{where}: unknown statistic {item!r}; the built-in ones are "
                                         f"{', '.join(STATISTICS)}, or give a function f(values, weights)")
            found.append((item, STATISTICS[item]))
        elif _is_pair(item):
            if not item[0].isidentifier():
                raise ConfigurationError(f"{where}: a statistic's name must be an identifier, got {item[0]!r}")
            found.append((item[0], item[1]))
        elif callable(item):
            name = getattr(item, "__name__", "")
            if not name.isidentifier():
                raise ConfigurationError(f"{where}: the function {item!r} has no usable name ({name!r}); define it "
                                         "with def, or give a (name, function) pair")
            found.append((name, item))
        else:
            raise ConfigurationError(f"{where}: {item!r} is no statistic; give a name of {', '.join(STATISTICS)}, "
                                     "a function f(values, weights) or a (name, function) pair")
    names = [name for name, _ in found]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{where} names a statistic twice: {names}")
    return found


def _is_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and callable(item[1])


def summarize(results: Sequence[Result], rules: Optional[MetricRules] = None) -> Summary:
    """Aggregate ``results`` metric by metric; the order of ``results`` does not matter.

    A metric missing from some results is aggregated over the results that have it, weighted by
    their samples.

    Raises:
        ConfigurationError: a function of ``rules`` raised or did not return a number.
    """
    rules = rules or _DEFAULT_RULES
    ordered = sorted(results, key=lambda r: client_order(r.client))
    summary = Summary(clients=len(ordered), num_samples=sum(r.num_samples for r in ordered))
    names = sorted({name for r in ordered for name in r.metrics})
    for metric in names:
        having = [r for r in ordered if metric in r.metrics]
        values = [float(r.metrics[metric]) for r in having]
        weights = [r.num_samples for r in having]
        stats: Dict[str, Optional[float]] = {}
        for name, function in rules.statistics(metric):
            try:
                value = function(list(values), list(weights))
            except OverflowError:
                value = math.inf  # a sum beyond float range: not finite, kept as None
            except Exception as exc:
                raise ConfigurationError(f"the statistic {name!r} of metric {metric!r} raised "
                                         f"{type(exc).__name__}: {exc}") from exc
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigurationError(f"the statistic {name!r} of metric {metric!r} must return a number, "
                                         f"got {type(value).__name__}")
            stats[name] = float(value) if math.isfinite(value) else None
        summary.metrics[metric] = stats
    return summary


_DEFAULT_RULES = MetricRules()

#: Record kinds of metrics, in the order the report table shows them.
KINDS = ("train", "federated", "centralized")


class History:
    """What a run's record holds per version, in memory: aggregated versions and evaluations.

    It is fed the record's ``version`` and ``evaluation`` entries (:mod:`openfl_api.record`).
    """

    def __init__(self) -> None:
        self.versions: Dict[int, Dict[str, Any]] = {}
        self.evaluations: Dict[str, Dict[int, Dict[str, Any]]] = {}

    def add(self, entry: Mapping[str, Any]) -> None:
        """Keep a record entry if it is a ``version`` or an ``evaluation``."""
        event = entry.get("event")
        if event == "version":
            self.versions[int(entry["version"])] = dict(entry)
        elif event == "evaluation":
            self.evaluations.setdefault(str(entry["kind"]), {})[int(entry["version"])] = dict(entry)

    def metrics(self, kind: str, version: int) -> Dict[str, Dict[str, Optional[float]]]:
        """The aggregated metrics of ``kind`` (``"train"``, ``"federated"``, ``"centralized"``, or
        a kind given to ``api.log_metrics``) at ``version``; empty when there are none."""
        if kind == "train":
            return dict(self.versions.get(version, {}).get("metrics", {}))
        return dict(self.evaluations.get(kind, {}).get(version, {}).get("metrics", {}))

    def latest(self, kind: str) -> Tuple[Optional[int], Dict[str, Dict[str, Optional[float]]]]:
        """``(version, metrics)`` of the newest entry of ``kind`` with metrics, or ``(None, {})``."""
        source = self.versions if kind == "train" else self.evaluations.get(kind, {})
        for version in sorted(source, reverse=True):
            if source[version].get("metrics"):
                return version, dict(source[version]["metrics"])
        return None, {}

    def kinds(self) -> List[str]:
        """The kinds of metrics held, training first."""
        held = (["train"] if any(v.get("metrics") for v in self.versions.values()) else [])
        others = sorted(k for k, v in self.evaluations.items() if any(e.get("metrics") for e in v.values()))
        return held + sorted(others, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k))

    def table(self, limit: int = 20) -> str:
        """Per version: uploads, the round's time split and the mean of every metric; at most
        ``limit`` rows (evenly spread, first and last kept) when there are more versions."""
        versions = sorted(set(self.versions) | {v for kind in self.evaluations.values() for v in kind})
        if not versions:
            return ""
        shown = versions
        if len(versions) > limit:
            step = (len(versions) - 1) / (limit - 1)
            shown = sorted({versions[round(i * step)] for i in range(limit)})
        columns = [(kind, name) for kind in self.kinds() for name in _names(self, kind)]
        table = PrettyTable(["version", "uploads", "round s", "waiting s", "receiving s", "aggregating s",
                             *[f"{kind} {name}" for kind, name in columns]])
        for version in shown:
            entry = self.versions.get(version, {})
            timing = entry.get("timing") or {}
            row: List[Any] = [version, entry.get("uploads", "")]
            row += [_number(timing.get(part)) for part in ("round", "waiting", "receiving", "aggregating")]
            for kind, name in columns:
                row.append(_number(self.metrics(kind, version).get(name, {}).get("mean")))
            table.add_row(row)
        text = table.get_string()
        if len(shown) < len(versions):
            text += f"\n{len(shown)} of {len(versions)} versions shown; the record holds every one"
        return text


def _names(history: History, kind: str) -> List[str]:
    source = history.versions.values() if kind == "train" else history.evaluations.get(kind, {}).values()
    return sorted({name for entry in source for name, stats in entry.get("metrics", {}).items() if "mean" in stats})


def _number(value: Any) -> str:
    if value is None or value == "":
        return ""
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
