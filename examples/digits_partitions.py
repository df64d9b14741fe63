"""FedAvg on scikit-learn's digits under three partitions: IID, Dirichlet(0.5), 2 labels per client.

    python examples/digits_partitions.py [--rounds 20] [--plot digits_partitions.png]

One command, one process: each partition runs as its own federation through
``openfl_api.simulate`` (a backend thread and one frontend thread hosting the 10 clients), and the
backend prints the test accuracy of every version. The accuracies per version are plotted against
the version for the three partitions (needs matplotlib: ``pip install openfl_api[plot]``).

The federation itself is an ordinary script: with ``--partition`` it runs as one rank, so the
same file also runs with the launcher, the 10 clients shared by the frontends::

    python -m openfl_api.launch --nproc_per_node 3 examples/digits_partitions.py --partition dirichlet
    python -m openfl_api.simulate --nproc_per_node 3 examples/digits_partitions.py --partition dirichlet

Model: MLP 64-64-10; each client trains 5 local epochs per version (batch 16, SGD lr 0.1) with
the batch order drawn from its own generator; FedAvg weights updates by samples. Several local
epochs let the clients drift apart, which is where label skew costs accuracy. Needs
scikit-learn (``pip install openfl_api[digits]``).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import openfl_api as ofl
from openfl_api import aggregate, data
from openfl_api.simulate import simulate
from openfl_api.virtual_clients import VirtualClients, init_linear_, split_clients

CLIENTS = 10
PARTITIONS = ("iid", "dirichlet", "labels")
LABELS = {"iid": "IID", "dirichlet": "Dirichlet(0.5)", "labels": "2 labels per client"}


def mlp(seed: int) -> torch.nn.Sequential:
    """MLP 64-64-10 initialised as torch.nn.Linear does, from its own generator (simulated ranks
    are threads sharing torch's global generator)."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return init_linear_(net, seed)


def split(partition: str, labels: torch.Tensor, seed: int) -> data.Partition:
    if partition == "iid":
        return data.Partition(data.iid(len(labels), CLIENTS, seed=seed))
    if partition == "dirichlet":
        return data.Partition(data.dirichlet(labels, CLIENTS, alpha=0.5, seed=seed))
    return data.Partition(data.shards(labels, CLIENTS, labels_per_client=2, seed=seed))


class Evaluate(ofl.Step):
    """Backend: test accuracy of every new version, printed and kept in ``accuracy``."""

    roles = frozenset({"backend"})

    def __init__(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label: str) -> None:
        self.net, self.x, self.y, self.label = net, x, y, label
        self.accuracy: List[float] = []

    def after_aggregate(self, api) -> None:
        with torch.no_grad():
            accuracy = (self.net(self.x).argmax(1) == self.y).float().mean().item()
        self.accuracy.append(accuracy)
        print(f"{self.label}: version {api.version} accuracy {100 * accuracy:.2f} %", flush=True)


def federation(argv: Optional[Sequence[str]] = None) -> Optional[List[float]]:
    """One rank of the federation; the backend returns the accuracy of versions 1, 2, ..."""
    parser = ofl.parser.build_parser()
    parser.add_argument("--partition", choices=PARTITIONS, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per version")
    args = parser.parse_args(argv)

    digits = data.load_digits(seed=args.seed)
    parts = split(args.partition, digits.y_train, args.seed)
    hosted = split_clients(range(CLIENTS), args.world_size - 1, args.rank - 1) if args.rank > 0 else None
    api = ofl.API(frontend=args.rank > 0, clients=hosted)
    api.set_aggregate_triggers(ofl.AggregateCount(count=CLIENTS))
    net = mlp(args.seed)
    evaluate = Evaluate(net, digits.x_test, digits.y_test, LABELS[args.partition])
    with ofl.StepAt(api):
        ofl.ClientSampling(fraction=1.0, min_clients=CLIENTS)  # every client, accumulated in id order
        ofl.StopAtVersion(max_version=args.rounds)
    api.register_step(evaluate)
    api.build_connection(address=ofl.Address(args=args))
    opt = torch.optim.SGD(net.parameters(), lr=args.lr)
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), opt)
    api.set_state_dict(net.state_dict(keep_vars=True))

    shares = [torch.from_numpy(index.copy()) for index in parts]

    def train(client) -> int:
        x, y = digits.x_train[shares[int(client.id)]], digits.y_train[shares[int(client.id)]]
        for _ in range(args.epochs):
            for batch in torch.randperm(len(y), generator=client.generator).split(16):
                opt.zero_grad()
                F.cross_entropy(net(x[batch]), y[batch]).backward()
                opt.step()
        return len(y)

    with api:
        api.run()
        VirtualClients(api, net, train, optimizer=opt, seed=args.seed).run()
    api.finish()
    return evaluate.accuracy if args.rank == 0 else None


def run(partition: str, rounds: int = 20, seed: int = 0) -> List[float]:
    """Simulate one partition in this process; the test accuracy of versions 1..rounds."""
    results = simulate(lambda: federation(["--partition", partition, "--rounds", str(rounds), "--seed", str(seed)]),
                       nproc_per_node=2)
    return results[0]


def plot(accuracies: Dict[str, List[float]], path: str) -> None:
    import matplotlib  # pip install openfl_api[plot]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for partition, values in accuracies.items():
        axes.plot(range(1, len(values) + 1), [100 * v for v in values], label=LABELS[partition])
    axes.set_xlabel("version")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("FedAvg on digits, 10 clients")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="digits_partitions.png", help="PNG to write ('' for none)")
    args = parser.parse_args(argv)
    ofl.logger.log_level("WARNING")
    accuracies = {partition: run(partition, args.rounds, args.seed) for partition in PARTITIONS}
    print()
    for partition, values in accuracies.items():
        print(f"{LABELS[partition]:20s} final accuracy {100 * values[-1]:.2f} % after {len(values)} versions")
    if args.plot:
        plot(accuracies, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    import sys

    if "--partition" in sys.argv:
        ofl.logger.log_level("WARNING")
        federation()
    else:
        main()
