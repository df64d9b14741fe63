"""Hierarchy: exact partial sums merged at the parent, the topology, and a two-level federation
(root, 2 edges, 4 leaves) against the flat federation of the same leaves under ``simulate``.
The same comparison with launched processes is in tests/distributed/test_hierarchy_processes.py."""

from __future__ import annotations

import math
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import openfl_api as ofl
from openfl_api import aggregate
from openfl_api.aggregate import ExactSum, PartialSums
from openfl_api.aggregate.partial import LEVELS, PLANES, WEIGHTS, weight_pieces
from openfl_api.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "hierarchy.py"


def uploads(count: int = 6):
    """Uploads of very different magnitudes (several levels) with an integer buffer each."""
    generator = torch.Generator().manual_seed(3)
    out = []
    for k in range(count):
        scale = 10.0 ** (k - count // 2)
        out.append({"w": torch.randn(3, 4, generator=generator) * scale, "b": torch.randn(5, generator=generator),
                    "n": torch.tensor(7 + k)})
    return out


def peak(upload) -> float:
    return max(float(upload["w"].abs().max()), float(upload["b"].abs().max()))


def test_exact_sums_merged_in_any_grouping_equal_the_flat_sum_while_a_mean_of_means_does_not():
    ups, weights = uploads(), [1.0, 2.5, 3.0, 0.5, 7.0, 1.25]
    shapes, floating = [(3, 4), (5,), ()], [True, True, False]

    def summed(indices):
        total = ExactSum(shapes, floating)
        for i in indices:
            total.add_([ups[i]["w"], ups[i]["b"], ups[i]["n"]], weights[i], peak=peak(ups[i]))
        return total

    flat = summed(range(6)).value()
    for groups in ([[0, 1], [2, 3], [4, 5]], [[5, 3, 1], [0], [4, 2]]):
        root = ExactSum(shapes, floating)
        for group in reversed(groups):
            root.merge_(summed(group).segments())
        assert all(torch.equal(a, b) for a, b in zip(flat, root.value()))
    # Edges that uploaded their float32 means would round once more: the root's model differs.
    groups = ([0, 1], [2, 3], [4, 5])
    root = ExactSum([(3, 4)])
    for g in groups:
        total = sum(weights[i] for i in g)
        mean = (summed(g).value()[0] / total).float()
        root.add_([mean], total)
    assert not torch.equal((root.value()[0] / math.fsum(weights)).float(), (flat[0] / math.fsum(weights)).float())


def test_weight_pieces_are_nonnegative_and_sum_exactly_to_the_weights():
    weights = [0.1, 0.2, 0.3, 1e-20, 3.0]
    pieces = weight_pieces(weights)
    assert all(p >= 0 for p in pieces) and len(pieces) > 1
    assert math.fsum(pieces + weight_pieces([0.7, 0.9])) == math.fsum(weights + [0.7, 0.9])
    assert weight_pieces([16, 24]) == [40.0] and weight_pieces([]) == [0.0]


def model_of(upload):
    return {"w": upload["w"].clone(), "b": upload["b"].clone(), "n": upload["n"].clone()}


def test_a_root_with_partial_sums_aggregates_the_flat_average_bit_for_bit():
    ups, samples = uploads(), [3, 5, 2, 8, 1, 4]
    params = [torch.zeros(3, 4), torch.zeros(5)]
    state = {"w": params[0], "b": params[1], "n": torch.tensor(0)}
    flat = aggregate.AverageAggregator(params)
    flat.bind(["w", "b"])
    for up, n in zip(ups, samples):
        flat.add(up, n, 1.0, peak(up))
    expected = flat.aggregate(state)

    root = PartialSums(aggregate.AverageAggregator(params), state)
    root.bind(["w", "b"])
    assert set(root.extra_layout()[1]) == {PLANES, LEVELS, WEIGHTS}
    plain = root.frontend_extras()  # nothing staged: a plain upload's zeros
    root.add({**ups[5], **plain}, samples[5], 1.0, peak(ups[5]))
    for group in ([0, 2], [4, 1, 3]):
        edge = aggregate.AverageAggregator(params)
        edge.bind(["w", "b"])
        for i in group:
            edge.add(ups[i], samples[i], 1.0, peak(ups[i]))
        sender = PartialSums(aggregate.NaiveAggregator(params), state)
        sender.stage(edge._sum.segments(), edge._weights)
        root.add({**model_of(ups[0]), **sender.frontend_extras()}, sum(samples[i] for i in group), 1.0, peak(ups[0]))
    saved = root.state_dict()  # a checkpoint of the merged sums resumes the same bits
    again = PartialSums(aggregate.AverageAggregator(params), state)
    again.bind(["w", "b"])
    again.load_state_dict(saved)
    for result in (root.aggregate(state), again.aggregate(state)):
        assert all(torch.equal(expected[k], result[k]) for k in expected)


def test_partial_sums_say_what_does_not_fit():
    params = [torch.zeros(2)]
    state = {"p": params[0]}
    with pytest.raises(ofl.ConfigurationError, match="plain Aggregator"):
        PartialSums(aggregate.Mean(params), state)
    with pytest.raises(ofl.ConfigurationError, match="state_keys"):
        PartialSums(aggregate.AverageAggregator(params, state_keys=("momentum_buffer",)), state)
    edge = aggregate.AverageAggregator(params)
    edge.bind(["p"])
    for scale in (1e-9, 1.0, 1e9):
        edge.add({"p": torch.tensor([scale, scale])}, 1, 1.0, scale)
    sender = PartialSums(aggregate.NaiveAggregator(params), state, planes=2)
    with pytest.raises(ofl.ConfigurationError, match="span 3 magnitude levels.*planes=3"):
        sender.stage(edge._sum.segments(), edge._weights)


def test_topology_gives_each_rank_its_role_and_addresses():
    tree = ofl.Topology.tree([2, 2])
    assert tree.world_size == 7 and [tree.role(r) for r in range(7)] == ["root", "edge", "edge"] + ["leaf"] * 4
    assert tree.children(2) == [5, 6] and tree.parent(6) == 2
    up, down = tree.addresses(ofl.Address(init_method="tcp://127.0.0.1:29500", world_size=7, rank=2))
    assert (up.init_method, up.world_size, up.rank) == ("tcp://127.0.0.1:29500", 3, 2)
    assert (down.init_method, down.world_size, down.rank) == ("tcp://127.0.0.1:29502", 3, 0)
    up, down = tree.addresses(ofl.Address(init_method="memory://x", world_size=7, rank=5))
    assert (up.init_method, up.rank, down) == ("memory://x.2", 1, None)
    assert ofl.Topology({1: 0, 2: 1}, hosts={1: "10.0.0.2"}).addresses(
        ofl.Address(init_method="tcp://10.0.0.1:29500", world_size=3, rank=2))[0].init_method == "tcp://10.0.0.2:29501"
    state = {"p": torch.zeros(1)}
    assert isinstance(tree.aggregator(0, aggregate.AverageAggregator([state["p"]]), state), PartialSums)
    assert isinstance(tree.aggregator(1, aggregate.AverageAggregator([state["p"]]), state), aggregate.AverageAggregator)


def test_topology_refuses_what_is_not_a_tree():
    with pytest.raises(ofl.ConfigurationError, match="each rank 1 .. n"):
        ofl.Topology({1: 0, 3: 1})
    with pytest.raises(ofl.ConfigurationError, match="on a loop"):
        ofl.Topology({1: 2, 2: 1})
    with pytest.raises(ofl.ConfigurationError, match="world_size 5"):
        ofl.Topology.tree([2, 2]).addresses(ofl.Address(init_method="memory://x", world_size=5, rank=1))
    with pytest.raises(ofl.RoleError, match="frontend=True"):
        ofl.Edge(parent=ofl.API(frontend=False), children=ofl.API(frontend=False))


def test_root_two_edges_four_leaves_give_the_flat_federations_weights_bit_for_bit(tmp_path):
    results = {}
    for name, fanout in (("flat", ["4"]), ("tree", ["2", "2"])):
        out = tmp_path / f"{name}.pt"
        simulate(str(SCRIPT), 1 + sum(math.prod(int(f) for f in fanout[:d + 1]) for d in range(len(fanout))),
                 args=["--fanout", *fanout, "--out", str(out)], timeout=timedelta(seconds=120))
        results[name] = torch.load(out, weights_only=True)
    flat, tree = results["flat"], results["tree"]
    assert list(flat) == list(tree)
    assert all(torch.equal(flat[k], tree[k]) for k in flat), [k for k in flat if not torch.equal(flat[k], tree[k])]
    assert int(flat["1.num_batches_tracked"]) > 0  # the leaves trained: the model moved


def run_tree(fanout, out: Path, *extra: str) -> dict:
    ranks = 1 + sum(math.prod(fanout[:d + 1]) for d in range(len(fanout)))
    simulate(str(SCRIPT), ranks, args=["--fanout", *map(str, fanout), "--out", str(out), *extra],
             timeout=timedelta(seconds=120))
    return torch.load(out, weights_only=True)


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_three_levels_give_the_flat_federations_weights_bit_for_bit(tmp_path):
    assert same(run_tree([8], tmp_path / "flat.pt"), run_tree([2, 2, 2], tmp_path / "tree.pt"))


@pytest.mark.parametrize("level", ["edges", "root"])
def test_one_level_asynchronous_and_the_other_synchronous_finish_every_version(tmp_path, level):
    final = run_tree([2, 2], tmp_path / "out.pt", "--asynchronous", level)
    assert int(final["1.num_batches_tracked"]) > 0


def test_root_and_edges_resume_from_their_checkpoints_to_the_uninterrupted_weights(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    run_tree([2, 2], tmp_path / "two.pt", "--rounds", "2", "--checkpoint", str(checkpoints))
    assert {p.name for p in checkpoints.iterdir()} >= {"rank0.2", "rank1.2", "rank2.2"}
    resumed = run_tree([2, 2], tmp_path / "resumed.pt", "--rounds", "3", "--checkpoint", str(checkpoints))
    assert same(run_tree([4], tmp_path / "flat.pt"), resumed)


def test_a_partial_sum_that_does_not_hold_is_left_out_and_the_model_stays():
    params = [torch.zeros(2)]
    state = {"p": params[0]}
    edge = aggregate.AverageAggregator(params)
    edge.bind(["p"])
    edge.add({"p": torch.tensor([1.0, 2.0])}, 3, 1.0, 2.0)
    sender = PartialSums(aggregate.NaiveAggregator(params), state)
    root = PartialSums(aggregate.AverageAggregator(params), state)
    root.bind(["p"])
    for name, change in ((LEVELS, lambda t: t.__setitem__((0, 0, 0), 10**6)),        # no float64 has that level
                         (PLANES, lambda t: t.__setitem__((0, 0), 2**62)),            # beyond its terms
                         (WEIGHTS, lambda t: t.__setitem__(0, float("nan")))):
        sender.stage(edge._sum.segments(), edge._weights)
        extras = sender.frontend_extras()
        change(extras[name])
        root.add({"p": torch.zeros(2), **extras}, 3)
    assert root.refused == 3 and root.count == 0
    assert torch.equal(root.aggregate(state)["p"], torch.zeros(2))
    sender.stage(edge._sum.segments(), edge._weights)
    root.add({"p": torch.zeros(2), **sender.frontend_extras()}, 3)
    assert torch.equal(root.aggregate(state)["p"], torch.tensor([1.0, 2.0]))


def test_an_edge_judges_its_childrens_uploads_by_its_own_version_and_discards_a_stale_one():
    from conftest import WAIT, Model, fast_api

    topology = ofl.Topology({1: 0, 2: 1, 3: 1})
    base = f"memory://edge-{id(topology)}"
    address = {r: ofl.Address(init_method=base, world_size=4, rank=r) for r in range(4)}
    root = fast_api(False)
    with ofl.StepAt(root):
        ofl.AggregateCount(count=1)
        ofl.StopAtVersion(max_version=2)
    root.build_connection(address=topology.addresses(address[0])[1])
    net = Model(0.0)
    state = net.state_dict(keep_vars=True)
    root.set_aggregator_and_optimizer(topology.aggregator(0, aggregate.AverageAggregator(net.parameters()), state))
    root.set_state_dict(state)
    root.start()
    edge = ofl.Edge(parent=fast_api(True), children=fast_api(False))
    errors, edges = [], []

    def run_edge():
        try:
            with ofl.StepAt(edge.children):
                ofl.AggregateCount(count=2)
            edge.build_connection(*topology.addresses(address[1]))
            model = Model(0.0)
            sd = model.state_dict(keep_vars=True)
            edge.set_state_dict(sd, topology.aggregator(1, aggregate.AverageAggregator(model.parameters()), sd))
            edge.run()
            edges.append(edge.children._server.ledger.count("discard"))
        except BaseException as exc:
            errors.append(exc)
        finally:
            edge.finish()

    def run_leaf(rank: int):
        api = fast_api(True)
        try:
            api.build_connection(address=topology.addresses(address[rank])[0])
            model = Model(float(rank))
            api.set_aggregator_and_optimizer(aggregate.AverageAggregator(model.parameters()))
            api.set_state_dict(model.state_dict(keep_vars=True))
            stale = rank == 2
            while api.download():
                with torch.no_grad():
                    model.weight.add_(rank)
                if stale:  # one upload tagged with a version the edge is not at
                    version, stale = api.version, False
                    api.update_version(version + 5)
                    assert api.upload(num_samples=rank)
                    api.update_version(version)
                if not api.upload(num_samples=rank):
                    break
                api.update_version()
        except BaseException as exc:
            errors.append(exc)
        finally:
            api.finish()

    threads = [threading.Thread(target=run_edge)] + [threading.Thread(target=run_leaf, args=(r,)) for r in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    root.finish()
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert root.version == 2 and edges == [1]
