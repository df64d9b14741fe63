"""Metric statistics across clients (order-free), their rules, the history table, the round clock."""

from __future__ import annotations

import math
import random

import pytest

from openfl_api.errors import ConfigurationError
from openfl_api.metrics import History, MetricRules, Result, summarize, weighted_mean
from openfl_api.timing import RoundClock


def results(count: int = 12, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [Result(str(i), rng.randint(1, 10 ** 6), {"loss": rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-8, 8),
                                                      "accuracy": rng.random()}) for i in range(count)]


def test_the_statistics_do_not_depend_on_the_order_of_the_results_bit_for_bit():
    base = results()
    want = summarize(base)
    rng = random.Random(1)
    for _ in range(20):
        shuffled = base[:]
        rng.shuffle(shuffled)
        assert summarize(shuffled) == want


def test_the_mean_is_weighted_by_samples_and_min_max_are_over_clients():
    got = summarize([Result("a", 1, {"x": 1.0}), Result("b", 3, {"x": 5.0})])
    assert got.clients == 2 and got.num_samples == 4
    assert got.metrics == {"x": {"mean": 4.0, "min": 1.0, "max": 5.0}}


def test_the_weighted_mean_is_the_correctly_rounded_sum_of_rounded_products():
    values, weights = [0.1] * 10, [1] * 10
    assert weighted_mean(values, weights) == math.fsum(values) / 10 == 0.1


def test_a_metric_some_clients_lack_is_aggregated_over_those_that_have_it():
    got = summarize([Result("1", 2, {"x": 1.0, "y": 7.0}), Result("2", 6, {"x": 3.0})])
    assert got.metrics["y"] == {"mean": 7.0, "min": 7.0, "max": 7.0}
    assert got.metrics["x"]["mean"] == 2.5


def test_functions_of_ones_own_get_the_values_in_natural_client_order_with_their_samples():
    seen = []

    def spread(values, weights):
        seen.append((list(values), list(weights)))
        return max(values) - min(values)

    rules = MetricRules(x=("mean", spread, ("first", lambda values, weights: values[0])), y=["sum", "median"])
    got = summarize([Result("10", 1, {"x": 3.0, "y": 1.0}), Result("2", 2, {"x": 1.0, "y": 2.0}),
                     Result("b", 3, {"x": 2.0, "y": 4.0})], rules)
    assert seen == [([1.0, 3.0, 2.0], [2, 1, 3])]  # "2" before "10", names after numbers
    assert got.metrics["x"] == {"mean": (2 + 3 + 6) / 6, "spread": 2.0, "first": 1.0}
    assert got.metrics["y"] == {"sum": 7.0, "median": 2.0}


@pytest.mark.parametrize("spec,match", [
    (("average",), "unknown statistic 'average'; the built-in ones are mean, min, max, sum, median"),
    ((), "must list at least one statistic"),
    ((lambda v, w: 0.0,), "has no usable name .*define it with def, or give a \\(name, function\\) pair"),
    (("mean", "mean"), "names a statistic twice"),
    ((3,), "3 is no statistic"),
    ((("not a name", max),), "a statistic's name must be an identifier"),
])
def test_a_rule_that_cannot_work_is_refused_when_built(spec, match):
    with pytest.raises(ConfigurationError, match=match):
        MetricRules(loss=spec)


def test_a_statistic_that_raises_or_returns_no_number_names_the_metric():
    def broken(values, weights):
        raise ZeroDivisionError("nope")

    def text(values, weights):
        return "high"

    with pytest.raises(ConfigurationError, match="the statistic 'broken' of metric 'x' raised ZeroDivisionError: nope"):
        summarize([Result("1", 1, {"x": 1.0})], MetricRules(x=[broken]))
    with pytest.raises(ConfigurationError, match="the statistic 'text' of metric 'x' must return a number, got str"):
        summarize([Result("1", 1, {"x": 1.0})], MetricRules(x=[text]))


def test_a_value_that_is_not_finite_is_kept_as_none():
    got = summarize([Result("1", 1, {"x": 1e308}), Result("2", 1, {"x": 1e308})], MetricRules(x=["sum"]))
    assert got.metrics == {"x": {"sum": None}}


def entry(event: str, version: int, **fields) -> dict:
    return {"schema": 1, "event": event, "version": version, "time": 0.0, "elapsed": 0.0, **fields}


def test_the_history_table_shows_the_time_split_and_the_mean_of_every_metric_per_version():
    history = History()
    timing = {"round": 2.0, "waiting": 1.5, "receiving": 0.25, "aggregating": 0.25}
    history.add(entry("upload", 0))
    history.add(entry("version", 1, uploads=2, timing=timing, metrics={"loss": {"mean": 0.5, "min": 0.1}}))
    history.add(entry("evaluation", 1, kind="federated", metrics={"accuracy": {"mean": 0.75}}))
    history.add(entry("evaluation", 1, kind="centralized", metrics={"accuracy": {"mean": 0.8}}))
    table = history.table()
    header = table.splitlines()[1]
    for column in ("version", "uploads", "round s", "waiting s", "receiving s", "aggregating s", "train loss",
                   "federated accuracy", "centralized accuracy"):
        assert column in header
    row = table.splitlines()[3].split("|")
    assert [cell.strip() for cell in row[1:-1]] == ["1", "2", "2", "1.5", "0.25", "0.25", "0.5", "0.75", "0.8"]
    assert history.latest("federated") == (1, {"accuracy": {"mean": 0.75}})
    assert history.kinds() == ["train", "federated", "centralized"]


def test_a_long_history_shows_evenly_spread_versions_with_the_first_and_the_last():
    history = History()
    for version in range(1, 101):
        history.add(entry("version", version, uploads=1, metrics={"loss": {"mean": 1.0 / version}}))
    lines = history.table(limit=5).splitlines()
    shown = [int(line.split("|")[1]) for line in lines[3:-2]]
    assert shown == [1, 26, 51, 75, 100]
    assert lines[-1] == "5 of 100 versions shown; the record holds every one"


def test_the_round_clock_counts_overlapping_uploads_once_and_the_rest_as_waiting():
    clock = RoundClock()
    clock.start(now=10.0)
    clock.receiving(11.0, 12.0)
    clock.receiving(11.5, 13.0)    # overlaps the first
    clock.receiving(14.0, 16.5)    # runs into the aggregation: counted up to its start
    clock.receiving(9.0, 10.5)     # began before the round: counted from its start
    timing = clock.aggregated(16.0, 17.0)
    assert timing.round == 7.0 and timing.aggregating == 1.0
    assert timing.receiving == pytest.approx(0.5 + 2.0 + 2.0)
    assert timing.waiting == pytest.approx(7.0 - 4.5 - 1.0)
    after = clock.aggregated(20.0, 20.5)  # the next round starts where the last aggregation ended
    assert after.round == 3.5 and after.receiving == 0.0 and after.waiting == 3.0
