"""Strategies in one process: the exact checks of each algorithm against FedAvg or its published rule,
the robust rules, server optimizers, attacks, round configuration and named extras.

Federation-level checks run examples/strategies_federation.py under ``simulate()`` with small
settings; the rules are checked on hand-made tensors, against independent implementations of the
papers' formulas written here with numpy.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import openfl_api as ofl
from openfl_api import aggregate, strategies
from openfl_api.aggregate import robust
from openfl_api.aggregate.exact import ExactSum
from openfl_api.aggregate.server_opt import fedopt_step
from openfl_api.errors import ConfigurationError, PayloadError, RoleError
from openfl_api.payload.config import check_config
from openfl_api.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import strategies_federation as example  # noqa: E402

WAIT = timedelta(seconds=60)  # a federation that hangs fails the test in a minute
SMALL = ["--clients", "6", "--per_round", "6", "--rounds", "3", "--epochs", "3", "--samples", "12", "--features", "8",
         "--lr", "0.05", "--batch", "4", "--f", "1"]


def federation(tmp_path: Path, name: str, *argv: str) -> dict:
    """Run the example federation in this process (a backend and two frontends); its final weights."""
    saved = tmp_path / f"{name}.pt"
    threads = torch.get_num_threads()
    try:
        simulate(lambda: example.main([*SMALL, *argv, "--save", str(saved)]), nproc_per_node=3, timeout=WAIT)
    finally:
        torch.set_num_threads(threads)
    return torch.load(saved, weights_only=True)


def assert_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {float((a[name] - b[name]).abs().max())}"


def bound(cls, *shapes, **kwargs):
    """``cls`` over zero parameters of ``shapes`` named w0, w1, ..."""
    agg = cls([torch.nn.Parameter(torch.zeros(shape)) for shape in shapes], **kwargs)
    agg.bind([f"w{i}" for i in range(len(shapes))])
    return agg


def uploads(n: int, shape=(3,), seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [{"w0": torch.randn(shape, generator=g)} for _ in range(n)]


def add_all(agg, items, order=None, num_samples=None):
    for i in (order if order is not None else range(len(items))):
        extra = {}
        if isinstance(agg, aggregate.UpdateAggregator):
            extra["context"] = {"client": str(i), "version": 0, "staleness": 0, "asynchronous": False,
                                "max_staleness": 0}
        agg.add(items[i], num_samples if num_samples is not None else 1 + i, **extra)


def set_params(agg, values):
    """On a backend the aggregator's parameters are the global model: make them ``values``."""
    with torch.no_grad():
        for param, value in zip(agg.params, values):
            param.copy_(value)


ZERO = {"w0": torch.zeros(3)}


# ----------------------------------------------------------------- exact checks against FedAvg
def test_fedprox_with_mu_0_gives_fedavg_bit_for_bit_with_and_without_stragglers(tmp_path):
    for stragglers in ("0", "0.5"):
        work = ["--work", "stragglers", "--stragglers", stragglers]
        fedavg = federation(tmp_path, f"fedavg{stragglers}", "--algorithm", "fedavg", *work)
        fedprox = federation(tmp_path, f"fedprox{stragglers}", "--algorithm", "fedprox", "--mu", "0", *work)
        assert_equal(fedprox, fedavg)
    assert not torch.equal(federation(tmp_path, "mu", "--algorithm", "fedprox", "--mu", "0.5", *work)["weight"],
                           fedavg["weight"])


def test_fedprox_gradient_term_is_mu_times_the_distance_and_vanishes_at_the_start():
    net = torch.nn.Linear(2, 1)
    prox = strategies.FedProx(net, mu=0.5)
    net.weight.grad = torch.ones_like(net.weight)
    prox.correct_()
    assert torch.equal(net.weight.grad, torch.ones_like(net.weight))  # w == w_t: nothing added
    with torch.no_grad():
        net.weight += 2.0
    net.weight.grad = torch.zeros_like(net.weight)
    prox.correct_()
    assert_close(net.weight.grad, torch.full_like(net.weight, 1.0))
    assert_close(prox.penalty(), torch.tensor(0.5 / 2 * 4.0 * 2))


def test_scaffold_with_zero_control_variates_and_one_local_step_gives_uniform_fedavg_bit_for_bit(tmp_path):
    one_step = ["--rounds", "1", "--epochs", "1", "--batch", "100"]
    naive = federation(tmp_path, "fedavg", "--algorithm", "fedavg", *one_step)
    scaffold = federation(tmp_path, "scaffold", "--algorithm", "scaffold", *one_step)
    # FedAvg in the example weighs by samples; with equal sizes the plain mean is the same.
    assert_equal(scaffold, naive)


def test_scaffold_server_keeps_c_as_the_mean_of_all_client_variates():
    net = torch.nn.Linear(2, 1, bias=False)
    agg = strategies.Scaffold(net.parameters(), num_clients=4)
    agg.bind(["weight"])
    dcs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])]
    for i, dc in enumerate(dcs):  # two of the four clients take part
        agg.add({"weight": torch.zeros(1, 2), "extra/scaffold/dc/weight": dc}, 1,
                context={"client": str(i), "version": 0, "staleness": 0, "asynchronous": False, "max_staleness": 0})
    agg.aggregate({"weight": torch.zeros(1, 2)})
    assert_close(agg.c["weight"], (dcs[0] + dcs[1]).double() / 4)
    assert_close(agg.download_extras()["extra/scaffold/c/weight"], ((dcs[0] + dcs[1]) / 4))


def test_fednova_with_equal_local_steps_gives_fedavg_to_one_float32_rounding():
    # FedNova computes x - tau_eff * sum p_i (x - y_i) / ||a_i|| in float64: with equal normalisers
    # that is FedAvg's value up to the last rounding to float32.
    generator = torch.Generator().manual_seed(0)
    for steps in (1.0, 3.0, 7.0, 13.0, 44.0):
        fedavg, nova = bound(aggregate.AverageAggregator, (3,)), bound(strategies.FedNova, (3,))
        for i in range(4):
            item = {"w0": torch.randn(3, generator=generator)}
            fedavg.add(item, 2 + i)
            nova.add({**item, "extra/fednova/norm": torch.tensor(steps, dtype=torch.float64)}, 2 + i)
        current = {"w0": torch.randn(3, generator=generator)}
        assert_close(nova.aggregate(current), fedavg.aggregate(current), rtol=torch.finfo(torch.float32).eps, atol=0)


def test_fednova_matches_the_paper_formula_with_unequal_steps():
    nova = bound(strategies.FedNova, (3,))
    items, norms, sizes = uploads(3), [1.0, 4.0, 9.5], [5, 1, 2]
    x = np.array([0.5, -1.0, 2.0])
    for item, norm, n in zip(items, norms, sizes):
        nova.add({**item, "extra/fednova/norm": torch.tensor(norm, dtype=torch.float64)}, n)
    p = np.array(sizes) / sum(sizes)
    d = [x - item["w0"].double().numpy() for item in items]
    tau_eff = float(np.dot(p, norms))
    want = x - tau_eff * sum(pi * di / ai for pi, di, ai in zip(p, d, norms))
    got = nova.aggregate({"w0": torch.tensor(x, dtype=torch.float32)})["w0"]
    assert_close(got, torch.tensor(want, dtype=torch.float32))


@pytest.mark.parametrize("momentum,mu", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1)])
def test_fednova_client_normaliser_matches_the_closed_form(momentum, mu):
    net = torch.nn.Linear(2, 1)
    agg = strategies.FedNova(net.parameters())
    agg.bind(["weight", "bias"])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=momentum)
    local = agg.client(optimizer, mu=mu)
    tau = 7
    for _ in range(tau):
        local.correct_()
    if momentum:
        want = (tau - momentum * (1 - momentum ** tau) / (1 - momentum)) / (1 - momentum)
    elif mu:
        want = (1 - (1 - 0.05 * mu) ** tau) / (0.05 * mu)
    else:
        want = tau
    assert math.isclose(local.finish(), want, rel_tol=1e-12)
    assert float(agg.frontend_extras()["extra/fednova/norm"]) == local.norm


def test_fednova_refuses_momentum_with_a_proximal_term_and_non_sgd_optimizers():
    net = torch.nn.Linear(2, 1)
    agg = strategies.FedNova(net.parameters())
    agg.bind(["weight", "bias"])
    with pytest.raises(ConfigurationError, match="momentum or the proximal term, not both"):
        agg.client(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), mu=0.1)
    with pytest.raises(ConfigurationError, match="known for SGD"):
        agg.client(torch.optim.Adam(net.parameters()))


def test_feddyn_first_round_with_full_participation_doubles_the_mean_step_and_h_is_the_mean_gradient():
    agg = bound(strategies.FedDyn, (3,), alpha=0.1, num_clients=3)
    items = uploads(3)
    add_all(agg, items, num_samples=5)
    x0 = torch.tensor([0.25, -0.5, 1.0])
    new = agg.aggregate({"w0": x0})["w0"]
    mean = torch.stack([i["w0"] for i in items]).mean(0)
    assert_close(new, x0 + 2 * (mean - x0))
    # each client's g_k = -alpha (theta_k - theta_0): h is their mean
    g = [-0.1 * (i["w0"].double() - x0.double()) for i in items]
    assert_close(agg.h["w0"], sum(g) / 3)


def test_feddyn_client_keeps_g_and_starts_again_from_the_old_one_when_a_version_is_retrained():
    net = torch.nn.Linear(2, 1, bias=False)
    agg = strategies.FedDyn(net.parameters(), alpha=0.5)
    agg.bind(["weight"])
    first = agg.client(state=None, version=3)
    with torch.no_grad():
        net.weight += 1.0
    state = first.finish()
    assert_close(state["value"][0], torch.full((1, 2), -0.5))
    again = agg.client(state=state, version=3)  # the backend lost version 3: trained again
    assert torch.equal(again.g[0], torch.zeros(1, 2))
    later = agg.client(state=state, version=4)
    assert torch.equal(later.g[0], state["value"][0])
    with pytest.raises(ConfigurationError, match="made at version 3, after the version 2"):
        agg.client(state=state, version=2)


def test_qffl_with_q_0_gives_the_plain_mean_and_matches_the_paper_formula_for_q_1():
    items, losses = uploads(3), [0.5, 1.5, 3.0]
    x = torch.tensor([0.1, 0.2, -0.3])
    for q in (0.0, 1.0):
        agg = bound(strategies.QFedAvg, (3,), q=q, lr=0.1)
        set_params(agg, [x])
        for i, (item, loss) in enumerate(zip(items, losses)):
            agg.add({**item, "extra/qffl/loss": torch.tensor(loss, dtype=torch.float64)}, 10 + i)
        got = agg.aggregate({"w0": x})["w0"]
        L, xs = 10.0, x.double().numpy()
        deltas, hs = [], []
        for item, loss in zip(items, losses):
            f = loss + 1e-10
            dw = L * (xs - item["w0"].double().numpy())
            deltas.append(f ** q * dw)
            hs.append(q * f ** (q - 1) * float(dw @ dw) + L * f ** q)
        want = xs - sum(deltas) / sum(hs)
        assert_close(got, torch.tensor(want, dtype=torch.float32))
        if q == 0:
            assert_close(got, torch.stack([i["w0"] for i in items]).mean(0))


# ----------------------------------------------------------------- robust rules
def test_median_of_identical_uploads_is_that_upload_bit_for_bit():
    agg = bound(aggregate.Median, (5,))
    u = {"w0": torch.randn(5, generator=torch.Generator().manual_seed(3))}
    add_all(agg, [u] * 4)
    assert torch.equal(agg.aggregate({"w0": torch.zeros(5)})["w0"], u["w0"])


def test_median_of_two_is_the_mean_and_of_even_n_the_mean_of_the_middle_values():
    agg = bound(aggregate.Median, (3,))
    items = uploads(4)
    add_all(agg, items)
    ordered = torch.sort(torch.stack([i["w0"] for i in items]), dim=0).values
    assert_close(agg.aggregate(ZERO)["w0"], (ordered[1] + ordered[2]) / 2)


def test_trimmed_mean_with_beta_0_is_the_mean_and_with_half_minus_one_of_odd_n_the_median_bit_for_bit():
    items = uploads(5)
    tm, naive = bound(aggregate.TrimmedMean, (3,), beta=0.0), bound(aggregate.NaiveAggregator, (3,))
    add_all(tm, items)
    add_all(naive, items)
    assert torch.equal(tm.aggregate(ZERO)["w0"], naive.aggregate(ZERO)["w0"])
    tm, median = bound(aggregate.TrimmedMean, (3,), beta=0.4), bound(aggregate.Median, (3,))
    add_all(tm, items)
    add_all(median, items)
    assert torch.equal(tm.aggregate(ZERO)["w0"], median.aggregate(ZERO)["w0"])


def test_trimmed_mean_refuses_a_version_it_would_not_trim():
    agg = bound(aggregate.TrimmedMean, (3,), beta=0.1)
    add_all(agg, uploads(5))
    with pytest.raises(ConfigurationError, match=r"needs at least 10 uploads per version .* has 5"):
        agg.aggregate(ZERO)


def test_krum_returns_one_of_the_uploads_bit_for_bit_the_one_with_the_lowest_brute_force_score():
    items = uploads(7, shape=(4,), seed=5)
    items[2] = {"w0": items[2]["w0"] * 50}  # an outlier never wins
    agg = bound(aggregate.Krum, (4,), f=2)
    add_all(agg, items)
    got = agg.aggregate({"w0": torch.zeros(4)})["w0"]
    points = [i["w0"].double() for i in items]
    scores = []
    for i, p in enumerate(points):
        d = sorted(float(((p - q) ** 2).sum()) for j, q in enumerate(points) if j != i)
        scores.append(sum(d[:7 - 2 - 2]))
    best = int(np.argmin(scores))
    assert torch.equal(got, items[best]["w0"]) and agg.selected == [str(best)]


def test_multikrum_keeping_every_upload_is_the_mean_and_bulyan_with_f_0_is_the_mean():
    items = uploads(5)
    naive = bound(aggregate.NaiveAggregator, (3,))
    add_all(naive, items)
    mean = naive.aggregate(ZERO)
    for agg in (bound(aggregate.MultiKrum, (3,), f=0, m=5), bound(aggregate.Bulyan, (3,), f=0)):
        add_all(agg, items)
        assert_close(agg.aggregate(ZERO), mean)


@pytest.mark.parametrize("rule,kwargs,n,message", [
    (aggregate.Krum, {"f": 2}, 6, r"Krum\(f=2, m=1\) needs at least 7 uploads per version \(n > 2f \+ 2 with f = 2"),
    (aggregate.Bulyan, {"f": 1}, 6, r"Bulyan\(f=1\) needs at least 7 uploads per version \(n >= 4f \+ 3"),
    (aggregate.Median, {"f": 2}, 4, r"Median\(f=2\) needs at least 5 uploads per version \(n >= 2f \+ 1"),
])
def test_each_robust_rule_says_how_many_uploads_it_needs(rule, kwargs, n, message):
    agg = bound(rule, (3,), **kwargs)
    add_all(agg, uploads(n))
    with pytest.raises(ConfigurationError, match=message):
        agg.aggregate(ZERO)


@pytest.mark.parametrize("rule,kwargs", [(aggregate.Median, {}), (aggregate.TrimmedMean, {"beta": 0.2}),
                                         (aggregate.Krum, {"f": 1}), (aggregate.MultiKrum, {"f": 1}),
                                         (aggregate.Bulyan, {"f": 1}), (aggregate.Mean, {"max_norm": 0.5})])
def test_robust_rules_do_not_depend_on_the_arrival_order(rule, kwargs):
    items = uploads(7, seed=11)
    items[3] = dict(items[0])  # a tie: Krum keeps the lower client id
    results = []
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 3, 5, 0, 2, 4, 1], [3, 0, 1, 2, 6, 5, 4]):
        agg = bound(rule, (3,), **kwargs)
        add_all(agg, items, order=order)
        results.append(agg.aggregate(ZERO)["w0"])
    assert all(torch.equal(r, results[0]) for r in results)


def test_robust_rules_agree_with_the_pure_functions_on_a_stack():
    points = torch.randn(9, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(robust.median(points), torch.from_numpy(np.median(points.numpy(), axis=0)))
    assert_close(robust.trimmed_mean(points, 2), torch.from_numpy(
        np.sort(points.numpy(), axis=0)[2:7].mean(axis=0)))
    value, selected = robust.bulyan(points, 1)
    assert len(selected) == 7 and len(set(selected)) == 7
    chosen = np.sort(points[selected].numpy(), axis=0)
    assert bool(((value.numpy() >= chosen[0]) & (value.numpy() <= chosen[-1])).all())


def test_norm_clipping_scales_an_update_to_max_norm_and_leaves_small_ones():
    agg = bound(aggregate.Mean, (2,), max_norm=1.0, weighted=False)
    x = torch.tensor([1.0, 1.0])
    set_params(agg, [x])
    agg.add({"w0": x + torch.tensor([3.0, 4.0])}, 1)  # norm 5 -> 1
    agg.add({"w0": x + torch.tensor([0.0, 0.5])}, 1)  # norm 0.5: kept
    got = agg.aggregate({"w0": x})["w0"]
    assert_close(got, x + (torch.tensor([0.6, 0.8]) + torch.tensor([0.0, 0.5])) / 2)
    assert agg.clipped == 1


# ----------------------------------------------------------------- server optimizers
def reddi(rule, x, deltas, lr, beta1, beta2, tau, v0=0.0):
    """Reddi et al.'s Algorithm 2, written from the paper with numpy, for a list of Delta_t."""
    m, v = np.zeros_like(x), np.full_like(x, v0)
    for delta in deltas:
        m = beta1 * m + (1 - beta1) * delta
        if rule == "adagrad":
            v = v + delta ** 2
        elif rule == "adam":
            v = beta2 * v + (1 - beta2) * delta ** 2
        else:
            v = v - (1 - beta2) * delta ** 2 * np.sign(v - delta ** 2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("server,rule", [(aggregate.FedAdagrad(lr=0.1, tau=1e-3), "adagrad"),
                                         (aggregate.FedAdam(lr=0.1, tau=1e-3), "adam"),
                                         (aggregate.FedYogi(lr=0.05, tau=1e-2), "yogi")])
def test_adaptive_server_optimizers_follow_reddi_et_al_over_three_versions(server, rule):
    agg = bound(aggregate.Mean, (4,), server=server, weighted=False)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    xs, deltas = x.numpy().copy(), []
    for version in range(3):
        ys = [x + 0.1 * torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3)]
        for y in ys:
            agg.add({"w0": y.float()}, 1)
        deltas.append(np.mean([y.float().double().numpy() for y in ys], axis=0) - x.float().double().numpy())
        x = agg.aggregate({"w0": x.float()})["w0"].double()
    want = reddi(rule, np.float32(xs).astype(np.float64), deltas, server.lr, server.beta1, server.beta2, server.tau)
    # each version's result is rounded to the model's float32, the reference runs in float64
    assert_close(x.numpy(), want, rtol=1e-5, atol=1e-6)


def test_fedavgm_is_torch_sgd_with_momentum_on_the_pseudo_gradient():
    agg = bound(aggregate.Mean, (3,), server=aggregate.FedAvgM(lr=0.7, momentum=0.9), weighted=False)
    reference = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9)
    x = torch.zeros(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ys = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(2)]
        for y in ys:
            agg.add({"w0": y}, 1)
        reference.grad = x - (ys[0] + ys[1]) / 2
        sgd.step()
        x = agg.aggregate({"w0": x})["w0"]
        assert_close(x, reference.detach())


def test_fedavgm_with_lr_1_and_no_momentum_and_adagrad_round_one_with_tiny_tau():
    items = uploads(3)
    fedavg, fedavgm = bound(aggregate.NaiveAggregator, (3,)), bound(aggregate.Mean, (3,), weighted=False,
                                                                     server=aggregate.FedAvgM(lr=1.0))
    add_all(fedavg, items)
    add_all(fedavgm, items)
    x = torch.tensor([0.3, 0.1, -0.2])
    set_params(fedavgm, [x])
    assert_close(fedavgm.aggregate({"w0": x}), fedavg.aggregate({"w0": x}))
    adagrad = bound(aggregate.Mean, (3,), weighted=False, server=aggregate.FedAdagrad(lr=0.5, tau=1e-12))
    set_params(adagrad, [x])
    add_all(adagrad, items)
    mean = torch.stack([i["w0"] for i in items]).mean(0)
    assert_close(adagrad.aggregate({"w0": x})["w0"], x + 0.5 * torch.sign(mean - x))


def test_fedadam_bias_correction_scales_the_step_as_kingma_and_ba():
    x, g = torch.zeros(2, dtype=torch.float64), torch.tensor([0.5, -2.0], dtype=torch.float64)
    m, v = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    plain, _, _ = fedopt_step("adam", x, g, m, v, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-8)
    corrected, _, _ = fedopt_step("adam", x, g, m, v, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-8, t=1,
                                  bias_correction=True)
    assert_close(corrected, plain * math.sqrt(1 - 0.99) / (1 - 0.9), rtol=1e-6, atol=0)


@pytest.mark.parametrize("build,message", [
    (lambda: aggregate.FedAvgM(lr=0), r"FedAvgM\(lr=...\) must be in \(0, inf"),
    (lambda: aggregate.FedAvgM(momentum=1.0), r"FedAvgM\(momentum=...\) must be in \[0, 1\)"),
    (lambda: aggregate.FedAdam(tau=0), r"FedAdam\(tau=...\) must be in \(0, inf"),
    (lambda: aggregate.FedYogi(beta2=1.5), r"FedYogi\(beta2=...\) must be in \[0, 1\)"),
    (lambda: aggregate.Mean([torch.zeros(1)], server=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)),
     r"must be a server optimizer such as aggregate.FedAdam"),
    (lambda: aggregate.Mean([torch.zeros(1)], max_norm=-1), r"max_norm=...\) must be a finite number > 0"),
    (lambda: aggregate.TrimmedMean([torch.zeros(1)], beta=0.5), r"beta=...\) must be a fraction in \[0, 0.5\)"),
    (lambda: aggregate.Krum([torch.zeros(1)], f=-1), r"Krum\(f=...\) must be an int >= 0"),
    (lambda: strategies.Scaffold([torch.zeros(1)], lr=0.5, server=aggregate.FedAdam()), "either lr=... or server="),
    (lambda: strategies.FedDyn([torch.zeros(1)], alpha=0), r"FedDyn\(alpha=...\) must be a finite number > 0"),
    (lambda: strategies.QFedAvg([torch.zeros(1)], q=-1, lr=0.1), r"QFedAvg\(q=...\) must be a finite number >= 0"),
    (lambda: strategies.FedProx([torch.zeros(1)], mu=float("nan")), r"FedProx\(mu=...\) must be a finite number"),
    (lambda: strategies.SignFlip(clients="01"), "must be a collection of client ids"),
])
def test_arguments_are_checked_with_a_message_that_says_what_must_hold(build, message):
    with pytest.raises(ConfigurationError, match=message):
        build()


# ----------------------------------------------------------------- asynchronous updates (FedBuff)
def context(client, version, staleness):
    return {"client": client, "version": version, "staleness": staleness, "asynchronous": True, "max_staleness": 4}


def test_fedbuff_with_fresh_uploads_and_lr_1_is_the_mean_and_stale_ones_count_as_updates_of_their_version():
    param = torch.nn.Parameter(torch.zeros(2))
    agg = aggregate.Mean([param], weighted=False, server=aggregate.FedAvgM(lr=1.0))
    agg.bind(["w0"])
    x0 = torch.tensor([1.0, 1.0])
    with torch.no_grad():
        param.copy_(x0)
    agg.add({"w0": torch.tensor([2.0, 1.0])}, 1, 1.0, context=context("a", 0, 0))
    agg.add({"w0": torch.tensor([1.0, 3.0])}, 1, 1.0, context=context("b", 0, 0))
    x1 = agg.aggregate({"w0": x0})["w0"]
    assert_close(x1, torch.tensor([1.5, 2.0]))
    with torch.no_grad():
        param.copy_(x1)
    # c trained from version 0 (x0) arrives at version 1 with staleness weight 0.5: its update is
    # y - x0 = (0, 2), weighed 0.5; d trained from version 1 adds (1, 0).
    agg.add({"w0": torch.tensor([1.0, 3.0])}, 1, 0.5, context=context("c", 0, 1))
    agg.add({"w0": x1 + torch.tensor([1.0, 0.0])}, 1, 1.0, context=context("d", 1, 0))
    x2 = agg.aggregate({"w0": x1})["w0"]
    assert_close(x2, x1 + (0.5 * torch.tensor([0.0, 2.0]) + torch.tensor([1.0, 0.0])) / 2)


def test_median_in_fedbuff_takes_the_staleness_weighted_updates_of_the_versions_the_uploads_came_from():
    param = torch.nn.Parameter(torch.zeros(2))
    agg = aggregate.Median([param])
    agg.bind(["w0"])
    x0 = torch.tensor([1.0, 1.0])
    with torch.no_grad():
        param.copy_(x0)
    for client, y in (("a", [2.0, 1.0]), ("b", [1.0, 3.0]), ("c", [3.0, 5.0])):
        agg.add({"w0": torch.tensor(y)}, 1, 1.0, context=context(client, 0, 0))
    x1 = agg.aggregate({"w0": x0})["w0"]
    assert torch.equal(x1, torch.tensor([2.0, 3.0]))
    with torch.no_grad():
        param.copy_(x1)
    # a trained from version 0 (update (1, 0) against x0, staleness weight 0.5) arrives at version 1
    # beside two fresh uploads with updates (0, 2) and (4, 4): the median of (0.5, 0), (0, 2) and
    # (4, 4) is (0.5, 2), applied to x1.
    agg.add({"w0": torch.tensor([2.0, 1.0])}, 1, 0.5, context=context("a", 0, 1))
    agg.add({"w0": x1 + torch.tensor([0.0, 2.0])}, 1, 1.0, context=context("b", 1, 0))
    agg.add({"w0": x1 + torch.tensor([4.0, 4.0])}, 1, 1.0, context=context("c", 1, 0))
    assert torch.equal(agg.aggregate({"w0": x1})["w0"], x1 + torch.tensor([0.5, 2.0]))


def test_an_asynchronous_update_aggregator_needs_a_bounded_staleness():
    agg = bound(aggregate.Median, (2,))
    with pytest.raises(ConfigurationError, match=r"set Asynchronous\(max_staleness=...\)"):
        agg.add({"w0": torch.zeros(2)}, 1, context={**context("a", 0, 0), "max_staleness": None})


def test_an_update_aggregator_in_an_asynchronous_federation_is_not_mixed_again():
    def main():
        args = ofl.parser.parse_args([])
        api = ofl.API(frontend=args.rank > 0, asynchronous=ofl.Asynchronous(alpha=0.5, max_staleness=4))
        api.set_aggregate_triggers(ofl.AggregateCount(count=1))
        with ofl.StepAt(api):
            ofl.StopAtVersion(max_version=1)
        api.build_connection(address=ofl.Address(args=args))
        net = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            net.weight.fill_(1.0)
        api.set_aggregator_and_optimizer(aggregate.Mean(net.parameters()), torch.optim.SGD(net.parameters(), lr=1))
        api.set_state_dict(net.state_dict(keep_vars=True))
        with api:
            api.run()
            while api.download():
                with torch.no_grad():
                    net.weight.fill_(3.0)
                if not api.upload():
                    break
                api.update_version()
        api.finish()
        return float(net.weight.detach())

    assert simulate(main, nproc_per_node=2, timeout=WAIT)[0] == 3.0  # x - (x - y) with lr 1, not a mix with alpha 0.5


# ----------------------------------------------------------------- attacks
def test_attacks_replace_the_trained_update_and_no_client_changes_nothing():
    start, trained = [torch.tensor([1.0, 1.0]), torch.tensor([4], dtype=torch.int64)], None
    g = torch.Generator().manual_seed(0)
    for attack, want in ((strategies.SignFlip([0], scale=2.0), torch.tensor([-1.0, 3.0])),
                         (strategies.ScaledUpdate([0], factor=3.0), torch.tensor([4.0, -2.0]))):
        trained = [torch.tensor([2.0, 0.0]), torch.tensor([5], dtype=torch.int64)]
        attack.apply_(trained, start, g)
        assert torch.equal(trained[0], want) and trained[1].item() == 5
    assert not strategies.SignFlip([]).targets("0") and strategies.SignFlip([0, "7"]).targets("7")


def test_virtual_clients_with_an_attack_send_the_attacked_model(tmp_path):
    clean = federation(tmp_path, "clean", "--algorithm", "fedavg")
    attacked = federation(tmp_path, "attacked", "--algorithm", "fedavg", "--attack", "signflip", "--malicious", "2")
    assert not torch.equal(clean["weight"], attacked["weight"])
    none = federation(tmp_path, "none", "--algorithm", "fedavg", "--attack", "signflip", "--malicious", "0")
    assert_equal(none, clean)


# ----------------------------------------------------------------- round configuration and extras
def test_check_config_accepts_json_values_and_names_what_is_wrong():
    assert check_config({"lr": 0.1, "epochs": {"3": 2}, "tags": ("a", None, True)}) == {
        "lr": 0.1, "epochs": {"3": 2}, "tags": ["a", None, True]}
    with pytest.raises(ConfigurationError, match=r"api.config\['lr'\] holds a Tensor; .* \.item\(\)"):
        check_config({"lr": torch.tensor(0.1)})
    with pytest.raises(ConfigurationError, match=r"api.config\['mu'\]: nan is not a finite number"):
        check_config({"mu": float("nan")})
    with pytest.raises(ConfigurationError, match="key 3 must be a str"):
        check_config({3: 1})
    with pytest.raises(PayloadError, match="the header field 'config' must be a dict"):
        check_config([1], error=PayloadError, where="the header field 'config'")
    with pytest.raises(ConfigurationError, match="bytes as JSON; at most 65536"):
        check_config({"big": "x" * 70000})


def test_a_schedule_step_serves_each_version_its_config_and_frontends_read_it(tmp_path):
    def main():
        args = ofl.parser.parse_args([])
        api = ofl.API(frontend=args.rank > 0)
        api.set_aggregate_triggers(ofl.AggregateCount(count=1, checkpoint=str(tmp_path / "ckpt")))
        with ofl.StepAt(api):
            strategies.RoundConfig(lambda version: {"lr": 0.1 * 0.5 ** version, "version": version})
            ofl.StopAtVersion(max_version=3)
        api.build_connection(address=ofl.Address(args=args))
        net = torch.nn.Linear(1, 1)
        api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
        api.set_state_dict(net.state_dict(keep_vars=True))
        seen = []
        with api:
            api.run()
            while api.download():
                seen.append(api.config)
                if not api.upload():
                    break
                api.update_version()
        api.finish()
        return seen if args.rank > 0 else api.config

    backend, frontend = simulate(main, nproc_per_node=2, timeout=WAIT)
    assert frontend == [{"lr": 0.1 * 0.5 ** v, "version": v} for v in range(3)]
    assert backend == {"lr": 0.025, "version": 2}
    saved = torch.load(tmp_path / "ckpt.3", weights_only=True)
    assert json.loads(saved["round_config"]) == {"lr": 0.025, "version": 2}


def test_the_config_is_set_on_the_backend_only_and_checked_there():
    api = ofl.API(frontend=True)
    assert api.config == {}
    with pytest.raises(RoleError, match="setting api.config belongs to the backend"):
        api.config = {"lr": 0.1}


def test_scaffold_serves_its_control_variate_beside_the_model_and_a_missing_upload_extra_is_named(tmp_path):
    def main():
        args = ofl.parser.parse_args([])
        api = ofl.API(frontend=args.rank > 0)
        api.set_aggregate_triggers(ofl.AggregateCount(count=1))
        with ofl.StepAt(api):
            ofl.StopAtVersion(max_version=2)
        api.build_connection(address=ofl.Address(args=args))
        net = torch.nn.Linear(2, 1)
        with torch.no_grad():  # a fixed start: a random one rounds (x - y) / lr differently each run
            net.weight.zero_()
            net.bias.zero_()
        scaffold = strategies.Scaffold(net.parameters(), num_clients=1)
        api.set_aggregator_and_optimizer(scaffold, torch.optim.SGD(net.parameters(), lr=0.1))
        api.set_state_dict(net.state_dict(keep_vars=True))
        seen, error = [], None
        with api:
            api.run()
            state = None
            while api.download():
                seen.append(scaffold.received("extra/scaffold/c/weight").clone())
                local = scaffold.client(lr=0.1, state=state, version=api.version)
                net.weight.grad = torch.ones_like(net.weight)
                net.bias.grad = torch.ones_like(net.bias)
                local.correct_()
                torch.optim.SGD(net.parameters(), lr=0.1).step()
                if api.version == 1:
                    try:
                        api.upload()  # without finish(): nothing staged
                    except ConfigurationError as exc:
                        error = str(exc)
                state = local.finish()
                if not api.upload():
                    break
                api.update_version()
        api.finish()
        return (seen, error) if args.rank > 0 else {n: t.clone() for n, t in scaffold.c.items()}

    c, (seen, error) = simulate(main, nproc_per_node=2, timeout=WAIT)
    # version 0: c = c_i = 0; one step of gradient 1 with lr 0.1 gives c_i+ = (x - y) / (1 * 0.1) = 1 = dc, and
    # N = 1, so c = 1. Version 1: the step corrects by c - c_i = 0 and c_i+ = 1 - 1 + 1: dc = 0, c stays 1.
    assert torch.equal(seen[0], torch.zeros(1, 2))
    assert_close(seen[1], torch.ones(1, 2))
    assert_close(c["weight"], torch.ones(1, 2, dtype=torch.float64))
    assert "lacks the extras ['extra/scaffold/dc/weight'" in error


def test_extras_are_checked_like_the_model_when_staged():
    agg = bound(strategies.FedNova, (2,))
    with pytest.raises(ConfigurationError, match=r"must be a torch.float64 tensor of shape \(\)"):
        agg.stage({"extra/fednova/norm": torch.tensor([1.0])})
    with pytest.raises(ConfigurationError, match="uploads no extra 'extra/other'"):
        agg.stage({"extra/other": torch.tensor(1.0)})


# ----------------------------------------------------------------- checkpoints
AGGREGATORS = {
    "mean-adam": lambda p: aggregate.Mean(p, server=aggregate.FedAdam(lr=0.1)),
    "fedavgm": lambda p: aggregate.Mean(p, server=aggregate.FedAvgM(lr=0.5, momentum=0.9), max_norm=2.0),
    "median": lambda p: aggregate.Median(p),
    "krum": lambda p: aggregate.MultiKrum(p, f=1),
    "bulyan": lambda p: aggregate.Bulyan(p, f=1),
    "scaffold": lambda p: strategies.Scaffold(p, num_clients=9),
    "fednova": lambda p: strategies.FedNova(p, server=aggregate.FedYogi()),
    "feddyn": lambda p: strategies.FedDyn(p, alpha=0.1, num_clients=9),
    "qffl": lambda p: strategies.QFedAvg(p, q=1.0, lr=0.1),
}


def extras_for(name, g):
    if name == "scaffold":
        return {"extra/scaffold/dc/w0": torch.randn(3, generator=g)}
    if name == "fednova":
        return {"extra/fednova/norm": torch.tensor(float(torch.randint(1, 9, (), generator=g)), dtype=torch.float64)}
    if name == "qffl":
        return {"extra/qffl/loss": torch.rand((), generator=g, dtype=torch.float64)}
    return {}


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_an_aggregator_saved_mid_version_and_loaded_into_a_fresh_one_continues_bit_for_bit(name, tmp_path):
    def fresh():
        param = torch.nn.Parameter(torch.zeros(3))
        agg = AGGREGATORS[name]([param])
        agg.bind(["w0"])
        return agg, param

    g = torch.Generator().manual_seed(4)
    rounds = [[{"w0": torch.randn(3, generator=g), **extras_for(name, g)} for _ in range(7)] for _ in range(3)]

    def run(agg, param, versions, start=0):
        x = param.detach().clone()
        for version in versions:
            for i in range(start if version == versions[0] else 0, 7):
                agg.add(rounds[version][i], 2 + i, context={"client": str(i), "version": version, "staleness": 0,
                                                             "asynchronous": False, "max_staleness": 0})
                if version == versions[-1] and i == 3 and start == 0 and stop_midway:
                    return x
            x = agg.aggregate({"w0": x})["w0"]
            with torch.no_grad():
                param.copy_(x)
        return x

    stop_midway = False
    whole, whole_param = fresh()
    want = run(whole, whole_param, [0, 1, 2])
    stop_midway = True
    first, first_param = fresh()
    run(first, first_param, [0, 1])  # stops with four uploads of version 1 added
    torch.save({"agg": first.state_dict(), "x": first_param.detach().clone()}, tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    second, second_param = fresh()
    second.load_state_dict(saved["agg"])
    with torch.no_grad():
        second_param.copy_(saved["x"])
    stop_midway = False
    got = run(second, second_param, [1, 2], start=4)
    assert torch.equal(got, want)


def test_a_checkpoint_of_another_aggregator_is_refused_with_the_reason():
    mean = bound(aggregate.Mean, (3,), server=aggregate.FedAdam())
    with pytest.raises(ConfigurationError, match="written without a server optimizer"):
        mean.load_state_dict({**bound(aggregate.Mean, (3,)).state_dict()})
    with pytest.raises(ConfigurationError, match="was not written by Mean"):
        mean.load_state_dict(bound(aggregate.AverageAggregator, (3,)).state_dict())


def test_exact_sum_takes_scalar_floating_entries():
    total = ExactSum([(), (2,)])
    total.add_([torch.tensor(1.5, dtype=torch.float64), torch.ones(2)], 2.0)
    total.add_([torch.tensor(0.25, dtype=torch.float64), torch.ones(2)], 1.0)
    assert [v.tolist() for v in total.value()] == [3.25, [3.0, 3.0]]


def test_a_torch_server_optimizer_is_refused_with_an_update_aggregator():
    net = torch.nn.Linear(1, 1)
    api = ofl.API(frontend=False)
    with pytest.raises(ConfigurationError, match="give it its server optimizer, e.g. server=aggregate.FedAdam"):
        api.set_aggregator_and_optimizer(aggregate.Median(net.parameters()), None,
                                         server_optimizer=torch.optim.SGD(net.parameters(), lr=1))
