"""Virtual clients (openfl_api.virtual_clients) and the one-process simulation (openfl_api.simulate),
in this process over memory:// pipes; the launcher and memory figures are in
tests/distributed/test_simulation_processes.py."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import openfl_api as ofl
from openfl_api import aggregate
from openfl_api.parser import environ, environment, parse_args
from openfl_api.simulate import SimulationError, main, simulate
from openfl_api.virtual_clients import ClientStates, VirtualClients, client_seed, split_clients

from conftest import WAIT

QUICK = timedelta(seconds=WAIT)


def federation(clients=6, frontends=1, rounds=2, fraction=1.0, train=None, momentum=0.0, states_dir=None,
               seed=0, max_loop=None):
    """A callable for simulate(): rank 0 serves, the others host ``split_clients`` of ``clients``.

    Returns the backend's final weights on rank 0 and the frontend's records on the others.
    """

    def rank():
        args = parse_args([])
        hosted = split_clients(range(clients), frontends, args.rank - 1) if args.rank > 0 else None
        api = ofl.API(frontend=args.rank > 0, clients=hosted, timeout=QUICK, connect_timeout=QUICK,
                      drain=timedelta(seconds=2), tick=timedelta(milliseconds=10))
        api.set_aggregate_triggers(ofl.AggregateCount(count=max(1, round(fraction * clients))))
        with ofl.StepAt(api):
            ofl.ClientSampling(fraction=fraction, seed=seed, min_clients=clients)
            ofl.StopAtVersion(max_version=rounds)
            if max_loop is not None:
                ofl.StopAtLoop(max_loop=max_loop)  # a backend whose frontend failed stops by itself
        api.build_connection(address=ofl.Address(args=args))
        net = torch.nn.Linear(3, 2)
        with torch.no_grad():
            net.weight.copy_(torch.arange(6.0).reshape(2, 3) / 10)
            net.bias.fill_(0.5)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=momentum)
        api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), opt)
        api.set_state_dict(net.state_dict(keep_vars=True))
        records = []

        def default_train(client):
            x = torch.randn(8, 3, generator=client.generator)
            records.append((client.id, client.version, net.weight.detach().clone(),
                            {k: v.clone() for k, v in opt.state.get(net.weight, {}).items()}))
            opt.zero_grad()
            (net(x) ** 2).mean().backward()
            opt.step()
            return 1 + int(client.id)

        states = ClientStates(states_dir) if states_dir is not None else None
        with api:
            api.run()
            VirtualClients(api, net, train or default_train, optimizer=opt, states=states, seed=seed).run()
        api.finish()
        if args.rank == 0:
            return {k: v.detach().clone() for k, v in net.state_dict().items()}, api.version
        return records

    return rank


# ----------------------------------------------------------------- seeds and splits


def test_client_seed_depends_on_seed_version_and_client_only():
    assert client_seed(0, 1, 3) == client_seed(0, 1, "3")
    seeds = {client_seed(s, v, c) for s in (0, 1) for v in (0, 1) for c in (0, 1, "a", "b")}
    assert len(seeds) == 16
    assert 0 <= client_seed(7, 9, "client-x") < 2 ** 63


def test_split_clients_deals_every_id_once_interleaved():
    parts = [split_clients(range(10), 3, i) for i in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


@pytest.mark.parametrize("parts,index,match", [(0, 0, "parts"), (3, 3, "index"), (2, -1, "index")])
def test_split_clients_refuses_bad_parts(parts, index, match):
    with pytest.raises(ofl.ConfigurationError, match=match):
        split_clients(range(4), parts, index)


# ----------------------------------------------------------------- the state store


def test_client_states_round_trip_through_files(tmp_path):
    states = ClientStates(tmp_path, cache=0)
    states[3] = {"momentum": torch.ones(4), "step": 2}
    assert (tmp_path / "3.pt").exists()
    assert torch.equal(states.get("3")["momentum"], torch.ones(4)) and states["3"]["step"] == 2
    assert states.get(4) is None and 4 not in states and 3 in states


def test_client_states_keep_only_cache_states_in_memory(tmp_path):
    states = ClientStates(tmp_path, cache=2)
    for client in range(5):
        states[client] = {"x": torch.full((2,), float(client))}
    assert len(states._cached) == 2 and len(states) == 5
    assert torch.equal(states[0]["x"], torch.zeros(2))  # read back from its file


def test_client_states_hand_out_copies(tmp_path):
    states = ClientStates(tmp_path)
    live = {"x": torch.zeros(2)}
    states["a"] = live
    live["x"].add_(1)  # an optimizer stepping its live state after it was saved
    got = states["a"]
    got["x"].add_(5)
    assert torch.equal(states["a"]["x"], torch.zeros(2))


def test_client_states_file_names_are_safe_for_any_id(tmp_path):
    states = ClientStates(tmp_path)
    states["../up"] = {"x": torch.ones(1)}
    assert [p.parent for p in tmp_path.iterdir()] == [tmp_path]
    assert "../up" in states


def test_client_states_without_a_directory_use_a_temporary_one():
    states = ClientStates()
    states[1] = {"x": torch.ones(1)}
    assert states.directory.is_dir() and len(states) == 1


def test_client_states_refuse_a_negative_cache(tmp_path):
    with pytest.raises(ofl.ConfigurationError, match=r"cache=...\) must be an int >= 0"):
        ClientStates(tmp_path, cache=-1)


# ----------------------------------------------------------------- the trainer


@pytest.mark.parametrize("build,match", [
    (lambda net, opt: VirtualClients(None, "net", lambda c: 1), "model=...\\) must be a torch.nn.Module"),
    (lambda net, opt: VirtualClients(None, net, None), "train=...\\) must be callable"),
    (lambda net, opt: VirtualClients(None, net, lambda c: 1, states=ClientStates()), "pass optimizer"),
    (lambda net, opt: VirtualClients(None, net, lambda c: 1, seed=-1), "seed=...\\) must be an int >= 0"),
])
def test_virtual_clients_refuse_bad_arguments(build, match):
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ofl.ConfigurationError, match=match):
        build(net, torch.optim.SGD(net.parameters(), lr=0.1))


def test_every_client_starts_from_the_downloaded_global_model():
    (final, version), records = simulate(federation(clients=4, rounds=2), 2, timeout=QUICK)
    assert version == 2 and len(records) == 8
    for round_version in (0, 1):
        starts = [weight for _, v, weight, _ in records if v == round_version]
        assert len(starts) == 4 and all(torch.equal(w, starts[0]) for w in starts)
    assert not torch.equal(records[0][2], records[4][2])  # version 1 is a new model


def test_each_client_gets_the_generator_of_its_seed_version_and_id():
    seen = []

    def train(client):
        seen.append((client.id, client.version, client.generator.initial_seed()))
        return 1

    simulate(federation(clients=3, rounds=2, train=train, seed=5), 2, timeout=QUICK)
    assert sorted(seen) == sorted((str(c), v, client_seed(5, v, c)) for c in range(3) for v in range(2))


def test_optimizer_state_is_cleared_between_clients_without_a_store():
    _, records = simulate(federation(clients=3, rounds=2, momentum=0.9), 2, timeout=QUICK)
    assert all(state == {} for _, _, _, state in records)


def test_optimizer_state_follows_each_client_with_a_store(tmp_path):
    _, records = simulate(federation(clients=3, rounds=2, momentum=0.9, states_dir=tmp_path), 2, timeout=QUICK)
    first = {cid: state for cid, v, _, state in records if v == 0}
    second = {cid: state for cid, v, _, state in records if v == 1}
    assert all(state == {} for state in first.values())
    assert all("momentum_buffer" in state for state in second.values())
    assert not torch.equal(second["0"]["momentum_buffer"], second["1"]["momentum_buffer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.pt", "1.pt", "2.pt"]


def test_a_train_function_must_return_num_samples():
    with pytest.raises(SimulationError, match="must return num_samples") as raised:
        simulate(federation(clients=2, rounds=1, train=lambda client: 0.5, max_loop=50), 2, timeout=QUICK)
    assert list(raised.value.failures) == [1]


def test_sampled_clients_only_are_trained_each_version():
    (_, version), records = simulate(federation(clients=10, rounds=3, fraction=0.3), 2, timeout=QUICK)
    assert version == 3 and len(records) == 9
    sampling = ofl.ClientSampling(fraction=0.3, seed=0)
    for v in range(3):
        expected = sampling.draw([str(c) for c in range(10)], v)
        assert [cid for cid, rv, _, _ in records if rv == v] == expected


def test_one_frontend_or_three_give_bit_identical_weights(tmp_path):
    one = simulate(federation(clients=9, frontends=1, rounds=3, fraction=0.7, momentum=0.9,
                              states_dir=tmp_path / "one"), 2, timeout=QUICK)[0][0]
    three = simulate(federation(clients=9, frontends=3, rounds=3, fraction=0.7, momentum=0.9,
                                states_dir=tmp_path / "three"), 4, timeout=QUICK)[0][0]
    assert all(torch.equal(one[k], three[k]) for k in one)


# ----------------------------------------------------------------- simulate()


def test_each_simulated_rank_sees_its_own_environment():
    def rank():
        args = parse_args([])
        return args.rank, args.world_size, args.init_method, ofl.Address(args=args).rank

    before = dict(os.environ)
    results = simulate(rank, 3, timeout=QUICK)
    assert [r[:2] for r in results] == [(0, 3), (1, 3), (2, 3)]
    assert len({r[2] for r in results}) == 1 and results[0][2].startswith("memory://simulate-")
    assert [r[3] for r in results] == [0, 1, 2]
    assert dict(os.environ) == before


def test_the_environment_overlay_holds_for_its_thread_only():
    seen = {}
    with environment({"RANK": "7"}):
        thread = threading.Thread(target=lambda: seen.setdefault("other", environ().get("RANK")))
        thread.start()
        thread.join(WAIT)
        seen["here"] = environ()["RANK"]
    assert seen == {"here": "7", "other": os.environ.get("RANK")}
    assert environ().get("RANK") == os.environ.get("RANK")


def test_a_rank_that_raises_is_reported_with_its_exception():
    def rank():
        if parse_args([]).rank == 1:
            raise KeyError("boom")

    with pytest.raises(SimulationError, match=r"rank 1: KeyError") as raised:
        simulate(rank, 2, timeout=QUICK)
    assert isinstance(raised.value.__cause__, KeyError)


def test_ranks_that_do_not_return_in_time_are_named():
    release = threading.Event()
    try:
        with pytest.raises(SimulationError, match=r"rank 1: did not return within --grace"):
            simulate(lambda: parse_args([]).rank == 1 and release.wait(WAIT), 2, grace=timedelta(seconds=0.2))
    finally:
        release.set()


@pytest.mark.parametrize("kwargs,match", [
    (dict(nproc_per_node=1), "nproc_per_node=...\\) must be an int >= 2"),
    (dict(nproc_per_node=2, timeout=5), "timeout=...\\) must be a datetime.timedelta"),
    (dict(nproc_per_node=2, args=["--x"]), "apply to a script or module"),
])
def test_simulate_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ofl.ConfigurationError, match=match):
        simulate(lambda: None, **kwargs)


def test_the_command_line_runs_a_script_on_every_rank(tmp_path, capsys):
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys, openfl_api as ofl\n"
        "args, extra = ofl.parser.build_parser().parse_known_args()\n"
        "print('rank', args.rank, 'of', args.world_size, extra, __name__)\n"
    )
    assert main(["--nproc_per_node", "3", str(script), "--flag"]) == 0
    lines = sorted(capsys.readouterr().out.splitlines())
    assert lines == [f"rank {r} of 3 ['--flag'] __main__" for r in range(3)]


def test_the_command_line_exits_2_on_a_missing_script(capsys):
    assert main(["--nproc_per_node", "2", "no-such-script.py"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_command_line_exits_1_when_a_rank_fails(tmp_path, capsys):
    script = Path(tmp_path / "fails.py")
    script.write_text("import openfl_api as ofl\nif ofl.parser.parse_args().rank == 1:\n    raise SystemExit(3)\n")
    assert main(["--nproc_per_node", "2", str(script)]) == 1
    assert "rank 1 failed: SystemExit: 3" in capsys.readouterr().err


def test_init_linear_is_reproducible_and_leaves_the_global_generator_alone() -> None:
    from openfl_api.virtual_clients import init_linear_

    first, second = (torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
                     for _ in range(2))
    before = torch.get_rng_state()
    init_linear_(first, seed=7)
    init_linear_(second, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
