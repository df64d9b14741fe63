"""The server optimizers and robust rules against Flower's strategies on the same arrays (an optional,
independent implementation: skipped unless ``flwr`` is installed, e.g. ``pip install flwr==1.42.0``).

Everything is float64. The robust rules agree to rounding (``rtol=1e-12``), and bit for bit where no
sum is involved (Median, Krum). The server optimizers start from a FedAvg mean, which openfl_api sums
exactly by rounding each term to ``2**-34`` of the largest value of its tensor (docs/reproducibility.rst)
and Flower with numpy: they agree to ``1e-9`` relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openfl_api import aggregate
from openfl_api.aggregate.server_opt import fedopt_step

flwr = pytest.importorskip("flwr")
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi  # noqa: E402
from flwr.server.strategy.aggregate import (  # noqa: E402
    aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg,
)

SHAPES = [(3, 2), (4,)]


def draw(n: int, seed: int) -> list:
    """``n`` uploads (two arrays each) and their num_examples."""
    rng = np.random.default_rng(seed)
    return [([rng.normal(size=s) for s in SHAPES], int(rng.integers(1, 20))) for _ in range(n)]


def ours(cls, results, current=None, **kwargs):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    agg = cls(params, **kwargs)
    agg.bind(["a", "b"])
    if current is not None:
        with torch.no_grad():
            for p, c in zip(params, current):
                p.copy_(torch.from_numpy(c))
    for index, (arrays, n) in enumerate(results):
        agg.add({"a": torch.from_numpy(arrays[0]), "b": torch.from_numpy(arrays[1])}, n,
                context={"client": str(index), "version": 0, "staleness": 0, "asynchronous": False,
                         "max_staleness": 0})
    start = current if current is not None else [np.zeros(s) for s in SHAPES]
    out = agg.aggregate({"a": torch.from_numpy(start[0]), "b": torch.from_numpy(start[1])})
    return agg, [out["a"].numpy(), out["b"].numpy()]


def fit_results(results):
    return [(None, FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays), num_examples=n,
                          metrics={})) for arrays, n in results]


def assert_arrays(got, want, exact=False, rtol=1e-12):
    for g, w in zip(got, want):
        if exact:
            assert np.array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol / 10)


def test_median_and_trimmed_mean_match_flower():
    results = draw(7, 0)
    assert_arrays(ours(aggregate.Median, results)[1], aggregate_median(results), exact=True)
    assert_arrays(ours(aggregate.TrimmedMean, results, beta=0.2)[1], aggregate_trimmed_avg(results, 0.2))


def test_krum_multikrum_and_bulyan_match_flower():
    results = draw(11, 1)
    assert_arrays(ours(aggregate.Krum, results, f=2)[1], aggregate_krum(results, 2, 0), exact=True)
    assert_arrays(ours(aggregate.Krum, results, f=2, m=5, weighted=True)[1], aggregate_krum(results, 2, 5))
    assert_arrays(ours(aggregate.Bulyan, results, f=2)[1],
                  aggregate_bulyan(list(results), 2, aggregate_krum, to_keep=0))


def run_flower(strategy, rounds):
    for server_round, results in enumerate(rounds, start=1):
        parameters, _ = strategy.aggregate_fit(server_round, fit_results(results), [])
    return parameters_to_ndarrays(parameters)


def run_ours(server, rounds, start):
    params = [torch.nn.Parameter(torch.from_numpy(s.copy())) for s in start]
    agg = aggregate.Mean(params, server=server)
    agg.bind(["a", "b"])
    current = [s.copy() for s in start]
    for results in rounds:
        for index, (arrays, n) in enumerate(results):
            agg.add({"a": torch.from_numpy(arrays[0]), "b": torch.from_numpy(arrays[1])}, n)
        out = agg.aggregate({"a": torch.from_numpy(current[0]), "b": torch.from_numpy(current[1])})
        current = [out["a"].numpy(), out["b"].numpy()]
        with torch.no_grad():
            for p, c in zip(params, current):
                p.copy_(torch.from_numpy(c))
    return current


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedyogi"])
def test_server_optimizers_match_flowers_strategies_over_three_rounds(name):
    start = [np.full(s, 0.1) for s in SHAPES]
    rounds = [draw(4, 10 + r) for r in range(3)]
    initial = ndarrays_to_parameters(start)
    if name == "fedavgm":
        flower, server = (FedAvgM(initial_parameters=initial, server_learning_rate=0.5, server_momentum=0.9),
                          aggregate.FedAvgM(lr=0.5, momentum=0.9))
    elif name == "fedadagrad":
        flower, server = (FedAdagrad(initial_parameters=initial, eta=0.1, tau=1e-3),
                          aggregate.FedAdagrad(lr=0.1, tau=1e-3))
    else:
        flower, server = (FedYogi(initial_parameters=initial, eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
                          aggregate.FedYogi(lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3))
    assert_arrays(run_ours(server, rounds, start), run_flower(flower, rounds), rtol=1e-9)


def test_fedadam_matches_flower_with_flowers_bias_correction_exponent():
    # Flower corrects round r with beta**(r + 1), one step ahead of Kingma and Ba's t = r.
    start = [np.full(s, -0.2) for s in SHAPES]
    rounds = [draw(3, 20 + r) for r in range(3)]
    flower = FedAdam(initial_parameters=ndarrays_to_parameters(start), eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    x = [torch.from_numpy(s.copy()) for s in start]
    m = [torch.zeros_like(t) for t in x]
    v = [torch.zeros_like(t) for t in x]
    for server_round, results in enumerate(rounds, start=1):
        total = sum(n for _, n in results)
        mean = [sum(arrays[i] * n for arrays, n in results) / total for i in range(len(SHAPES))]
        for i in range(len(SHAPES)):
            g = x[i] - torch.from_numpy(mean[i])
            x[i], m[i], v[i] = fedopt_step("adam", x[i], g, m[i], v[i], lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3,
                                           t=server_round + 1, bias_correction=True)
    assert_arrays([t.numpy() for t in x], run_flower(flower, rounds), rtol=1e-9)
