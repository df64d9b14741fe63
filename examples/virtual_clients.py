"""Thousands of clients on one machine: FedAvg over virtual clients with sampling.

    python -m openfl_api.simulate --nproc_per_node 2 examples/virtual_clients.py --clients 1000 --fraction 0.1
    python -m openfl_api.launch --nproc_per_node 4 examples/virtual_clients.py --clients 1000 --fraction 0.1

The same script, unchanged, runs as one process (``simulate``: backend and frontends are threads
over memory:// pipes) or as one process per rank (``launch``). The frontends share the clients
(frontend ``r`` hosts every ``(world_size - 1)``-th id from ``r - 1``) and train them one after the
other on one reusable model (:class:`~openfl_api.virtual_clients.VirtualClients`). Each client's data
is FedProx's Synthetic(0.5, 0.5), drawn from the client's id when it trains, so memory does not
grow with the number of clients. The backend samples ``--fraction`` of the clients per version
(``ClientSampling``, after all of them have joined) and accumulates their updates in id order, so
a fixed ``--seed`` gives bit-identical weights however the clients are split over processes.
``--save PATH``: the backend writes the final state_dict there.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

import openfl_api as ofl
from openfl_api import aggregate, data
from openfl_api.virtual_clients import ClientStates, VirtualClients, init_linear_, split_clients


def mlp(features: int, hidden: int, classes: int, seed: int) -> torch.nn.Sequential:
    """An MLP initialised as torch.nn.Linear does, but from its own generator: ranks that are
    threads of one process share torch's global generator."""
    net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
    return init_linear_(net, seed)


def client_data(client: str, samples: int, features: int, seed: int):
    """Client ``client``'s (x, y): FedProx Synthetic(0.5, 0.5) drawn from (seed, client id)."""
    ((x, y),) = data.synthetic(1, 0.5, 0.5, seed=np.random.default_rng([seed, int(client)]),
                               samples_per_client=samples, num_features=features)
    return x, y


def main() -> None:
    parser = ofl.parser.build_parser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=100, help="samples per client")
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0,
                        help="> 0: SGD momentum, kept per client between its rounds in --states")
    parser.add_argument("--states", default=None, help="folder for per-client optimizer state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="backend: write the final state_dict here")
    parser.add_argument("--log", default="WARNING")
    args = parser.parse_args()
    ofl.logger.log_level(args.log)

    frontends = args.world_size - 1
    hosted = split_clients(range(args.clients), frontends, args.rank - 1) if args.rank > 0 else None
    api = ofl.API(frontend=args.rank > 0, clients=hosted)
    sampled = max(1, round(args.fraction * args.clients))
    api.set_aggregate_triggers(ofl.AggregateCount(count=sampled))
    with ofl.StepAt(api):
        ofl.ClientSampling(fraction=args.fraction, seed=args.seed, min_clients=args.clients)
        ofl.StopAtVersion(max_version=args.rounds)
    api.build_connection(address=ofl.Address(args=args))

    net = mlp(args.features, args.hidden, 10, args.seed)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), opt)
    api.set_state_dict(net.state_dict(keep_vars=True))

    def train(client) -> int:
        x, y = client_data(client.id, args.samples, args.features, args.seed)
        for batch in torch.randperm(len(y), generator=client.generator).split(args.batch):
            opt.zero_grad()
            F.cross_entropy(net(x[batch]), y[batch]).backward()
            opt.step()
        return len(y)

    states = ClientStates(args.states) if args.momentum > 0 else None
    started = time.perf_counter()
    with api:
        api.run()
        trained = VirtualClients(api, net, train, optimizer=opt, states=states, seed=args.seed).run()
    api.finish()
    if args.rank == 0:
        print(f"backend: version {api.version} in {time.perf_counter() - started:.1f} s")
        if args.save:
            torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, args.save)
    else:
        print(f"rank {args.rank}: {trained} client updates from {len(hosted)} hosted clients")


if __name__ == "__main__":
    main()
