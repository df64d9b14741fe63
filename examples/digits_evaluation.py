"""Federated and centralized evaluation on scikit-learn's digits, 10 clients, with a record of the run.

    python -m openfl_api.simulate --record digits.jsonl examples/digits_evaluation.py
    python -m openfl_api.launch --nproc_per_node 3 --record digits.jsonl --logdir logs examples/digits_evaluation.py
    python -m openfl_api.plot digits.jsonl

Each of the 10 clients trains on its share of the training set (Dirichlet(0.5) label skew) and,
every ``--every`` versions and on the final model, evaluates the global model on its share of the
test set (an even split). The backend evaluates the same model on the whole test set, the union of
the clients' shares: weighted by samples, the clients' evaluation equals the backend's. The record
holds both per version, with the training loss; the plot command draws them.

Model: MLP 64-64-10, 1 local epoch per version (batch 16, SGD lr 0.1), FedAvg weighted by samples.
Needs scikit-learn (``pip install openfl_api[digits]``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

import openfl_api as ofl
from openfl_api import aggregate, data
from openfl_api.virtual_clients import VirtualClients, init_linear_, split_clients

CLIENTS = 10


def test(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """``(samples, {"accuracy", "loss"})`` of ``net`` on ``(x, y)``; the loss in float64, so that
    means weighted by samples agree with the mean over the union to the last digits."""
    logits = net(x).double()
    return len(y), {"accuracy": (logits.argmax(1) == y).double().mean().item(),
                    "loss": F.cross_entropy(logits, y).item()}


def federation(argv: Optional[Sequence[str]] = None) -> Any:
    """One rank of the federation; the backend returns ``api.history``."""
    parser = ofl.parser.build_parser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=1, help="federated evaluation every k versions")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)

    digits = data.load_digits(seed=args.seed)
    train_shares = data.Partition(data.dirichlet(digits.y_train, CLIENTS, alpha=0.5, seed=args.seed))
    test_shares = data.Partition(data.iid(len(digits.y_test), CLIENTS, seed=args.seed))
    hosted = split_clients(range(CLIENTS), args.world_size - 1, args.rank - 1) if args.rank > 0 else None
    api = ofl.API(frontend=args.rank > 0, clients=hosted)
    api.set_aggregate_triggers(ofl.AggregateCount(count=CLIENTS))
    net = init_linear_(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)),
                       args.seed)
    with ofl.StepAt(api):
        ofl.ClientSampling(fraction=1.0, min_clients=CLIENTS)  # every client, once all have joined
        ofl.StopAtVersion(max_version=args.rounds)
        ofl.FederatedEvaluation(every=args.every)
        ofl.CentralizedEvaluation(lambda: test(net, digits.x_test, digits.y_test))
    api.build_connection(address=ofl.Address(args=args))
    opt = torch.optim.SGD(net.parameters(), lr=args.lr)
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), opt)
    api.set_state_dict(net.state_dict(keep_vars=True))

    def train(client) -> tuple:
        share = torch.from_numpy(train_shares[int(client.id)].copy())
        x, y = digits.x_train[share], digits.y_train[share]
        losses = []
        for batch in torch.randperm(len(y), generator=client.generator).split(16):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return len(y), {"loss": sum(losses) / len(losses)}

    def evaluate(client) -> tuple:
        share = torch.from_numpy(test_shares[int(client.id)].copy())
        return test(net, digits.x_test[share], digits.y_test[share])

    with api:
        api.run()
        VirtualClients(api, net, train, optimizer=opt, seed=args.seed, evaluate=evaluate).run()
    api.finish()
    return api.history if args.rank == 0 else None


if __name__ == "__main__":
    ofl.logger.log_level("INFO")
    federation()
