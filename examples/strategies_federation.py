"""One federation script for every algorithm of openfl_api.strategies and openfl_api.aggregate.

    python -m openfl_api.simulate --nproc_per_node 2 examples/strategies_federation.py --algorithm scaffold
    python -m openfl_api.launch --nproc_per_node 3 examples/strategies_federation.py --algorithm scaffold

The same script runs as one process (``simulate``: the backend and the frontends are threads) or as
one process per rank (``launch``), the virtual clients shared by the frontends; for a fixed
``--seed`` both end with the same weights, bit for bit. ``--algorithm`` picks the backend's
aggregator and the client-side helper the training loop uses (``train_one`` below: the whole
algorithm-specific part is a few lines):

====================  ======================================================================
algorithm             backend aggregator / client-side helper
====================  ======================================================================
fedavg                ``AverageAggregator`` / none
fedprox               ``AverageAggregator`` / ``FedProx(net, mu)``: ``correct_()`` per step
scaffold              ``Scaffold`` / ``scaffold.client(lr, state, version)``
fednova               ``FedNova`` / ``fednova.client(optimizer)``
feddyn                ``FedDyn(alpha)`` / ``feddyn.client(state, version)``
qffl                  ``QFedAvg(q, lr)`` / ``qffl.client(loss before training)``
fedavgm, fedadagrad,  ``Mean(server=FedAvgM(...) / FedAdagrad / FedAdam / FedYogi)`` / none
fedadam, fedyogi
median, trimmedmean,  ``Median``, ``TrimmedMean(beta)``, ``Krum(f)``, ``MultiKrum(f)``,
krum, multikrum,      ``Bulyan(f)`` / none
bulyan
clip                  ``Mean(max_norm=...)`` (norm clipping of updates) / none
====================  ======================================================================

Each version the backend draws ``--per_round`` of the ``--clients`` clients and their local work,
and serves both in the round configuration (``api.config``): ``{"epochs": {client: E_k},
"mu": mu}``. ``--work fixed`` gives every client ``--epochs`` epochs; ``variable`` draws each
from 1..``--epochs``; ``stragglers`` makes ``--stragglers`` of the drawn clients run
``randint(1, --epochs)`` epochs (FedProx's protocol); with ``--drop_stragglers`` the backend
leaves them out of the version instead (the FedAvg baseline of that paper; a draw in which every
client straggles is drawn again). ``--attack signflip|scaled|gaussian --malicious M`` makes
clients ``0..M-1`` malicious (``VirtualClients(attack=...)``).

Data: ``--data synthetic`` is FedProx's Synthetic(``--alpha``, ``--beta``) with a 90/10 split per
client; ``--data digits`` is scikit-learn's digits split by Dirichlet(``--dirichlet``) over the
clients, or evenly at random with ``--dirichlet 0``, each client's share split 80/20 into training
and test samples (needs scikit-learn). The model is multinomial logistic regression. The backend logs the
global model's test accuracy and training loss after each version; ``--history PATH`` writes them
as JSON, ``--save PATH`` the final state_dict; ``--checkpoint PREFIX`` / ``--resume PREFIX``
checkpoint and resume the backend.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import openfl_api as ofl
from openfl_api import aggregate, data, strategies
from openfl_api.virtual_clients import ClientStates, VirtualClients, init_linear_, split_clients

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fednova", "feddyn", "qffl", "fedavgm", "fedadagrad", "fedadam",
              "fedyogi", "median", "trimmedmean", "krum", "multikrum", "bulyan", "clip")


def build_parser() -> argparse.ArgumentParser:
    parser = ofl.parser.build_parser()
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    parser.add_argument("--data", choices=("synthetic", "digits"), default="synthetic")
    parser.add_argument("--alpha", type=float, default=1.0, help="Synthetic(alpha, beta)")
    parser.add_argument("--beta", type=float, default=1.0, help="Synthetic(alpha, beta)")
    parser.add_argument("--samples", type=int, default=0, help="synthetic: samples per client; 0: log-normal sizes")
    parser.add_argument("--features", type=int, default=60, help="synthetic: input dimension")
    parser.add_argument("--dirichlet", type=float, default=0.1, help="digits: Dirichlet concentration; 0: IID")
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--per_round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20, help="local epochs (the most, with --work)")
    parser.add_argument("--work", choices=("fixed", "variable", "stragglers"), default="fixed")
    parser.add_argument("--stragglers", type=float, default=0.0, help="fraction of the drawn clients that straggle")
    parser.add_argument("--drop_stragglers", action="store_true", help="leave stragglers out (FedAvg's baseline)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01, help="local SGD learning rate")
    parser.add_argument("--mu", type=float, default=0.0, help="FedProx's proximal weight")
    parser.add_argument("--feddyn_alpha", type=float, default=0.01)
    parser.add_argument("--q", type=float, default=1.0, help="q-FFL's fairness exponent")
    parser.add_argument("--server_lr", type=float, default=None, help="server learning rate (server optimizers)")
    parser.add_argument("--server_momentum", type=float, default=0.9, help="FedAvgM's momentum")
    parser.add_argument("--tau", type=float, default=1e-3, help="FedAdagrad/FedAdam/FedYogi's adaptivity")
    parser.add_argument("--f", type=int, default=2, help="robust rules: malicious uploads to tolerate")
    parser.add_argument("--bulyan_f", type=int, default=None, help="Bulyan's f (default: --f); it needs n >= 4f + 3")
    parser.add_argument("--trim", type=float, default=0.2, help="TrimmedMean's beta")
    parser.add_argument("--max_norm", type=float, default=1.0, help="clip: the largest update norm")
    parser.add_argument("--attack", choices=("none", "signflip", "scaled", "gaussian"), default="none")
    parser.add_argument("--malicious", type=int, default=0, help="clients 0..M-1 attack")
    parser.add_argument("--attack_scale", type=float, default=1.0, help="signflip scale, scaled factor, gaussian std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--history", default=None, help="backend: write the accuracy and loss per version here")
    parser.add_argument("--save", default=None, help="backend: write the final state_dict here")
    parser.add_argument("--checkpoint", default=None, help="backend: checkpoint every version to PREFIX.<version>")
    parser.add_argument("--link_timeout", type=float, default=3.0,
                        help="seconds a pipe may hear nothing from its peer before it counts the link as cut")
    parser.add_argument("--log", default="WARNING")
    return parser


# ----------------------------------------------------------------- data and model
class Data:
    """Every client's training and test tensors, generated from the seed (the same on every rank)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.train: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.test: List[Tuple[torch.Tensor, torch.Tensor]] = []
        if args.data == "synthetic":
            sizes = None if args.samples == 0 else args.samples
            for x, y in data.synthetic(args.clients, args.alpha, args.beta, seed=args.seed, samples_per_client=sizes,
                                       num_features=args.features):
                cut = max(1, int(0.9 * len(y)))
                self.train.append((x[:cut], y[:cut]))
                self.test.append((x[cut:], y[cut:]))
            self.features = args.features
        else:
            digits = data.load_digits(seed=args.seed)
            x = torch.cat([digits.x_train, digits.x_test])
            y = torch.cat([digits.y_train, digits.y_test])
            if args.dirichlet > 0:
                parts = data.dirichlet(y, args.clients, alpha=args.dirichlet, seed=args.seed, min_size=5)
            else:
                parts = data.iid(len(y), args.clients, seed=args.seed)
            rng = np.random.default_rng([args.seed, 1])
            for indices in parts:  # each client's own samples, 80 % to train and 20 % to test
                index = torch.from_numpy(rng.permutation(indices))
                cut = max(1, int(0.8 * len(index)))
                self.train.append((x[index[:cut]], y[index[:cut]]))
                self.test.append((x[index[cut:]], y[index[cut:]]))
            self.features = 64
        self.x_test = torch.cat([x for x, _ in self.test])
        self.y_test = torch.cat([y for _, y in self.test])
        self.x_train = torch.cat([x for x, _ in self.train])
        self.y_train = torch.cat([y for _, y in self.train])


def logistic_regression(features: int, seed: int) -> torch.nn.Module:
    """Multinomial logistic regression, initialised from its own generator (simulated ranks are
    threads sharing torch's global one)."""
    return init_linear_(torch.nn.Linear(features, 10), seed)


# ----------------------------------------------------------------- backend steps
class Plan(ofl.Step):
    """Backend: draws the clients of each version and their local epochs, serves them in the round
    configuration, holds the downloads of the others and aggregates once every drawn client's
    upload is in (and, with ``checkpoint``, saves each version)."""

    roles = frozenset({"backend"})

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._version: Optional[int] = None
        self._chosen: Dict[str, int] = {}

    def plan(self, version: int) -> Dict[str, int]:
        """Client id -> local epochs for ``version``: a function of the seed and the version."""
        args = self.args
        for attempt in range(1000):
            rng = np.random.default_rng([args.seed, version, attempt])
            drawn = np.sort(rng.choice(args.clients, size=min(args.per_round, args.clients), replace=False))
            if args.work == "fixed":
                epochs = {int(c): args.epochs for c in drawn}
            elif args.work == "variable":
                epochs = {int(c): int(rng.integers(1, args.epochs + 1)) for c in drawn}
            else:
                straggling = set(rng.choice(drawn, size=int(round(args.stragglers * len(drawn))), replace=False).tolist())
                epochs = {int(c): (int(rng.integers(1, args.epochs)) if c in straggling else args.epochs)
                          for c in drawn.tolist()}
                if args.drop_stragglers:
                    epochs = {c: e for c, e in epochs.items() if c not in straggling}
            if epochs:
                return {str(c): e for c, e in sorted(epochs.items())}
        raise RuntimeError("every draw left no client")

    def _current(self, api: Any) -> bool:
        if self._version == api.version:
            return True
        if len(api.clients) < self.args.clients:
            return False
        self._chosen = self.plan(api.version)
        self._version = api.version
        api.expect(list(self._chosen))
        api.config = {"epochs": self._chosen, "mu": self.args.mu}
        return True

    def before_download(self, api: Any, transfer: Any) -> None:
        if not self._current(api):
            transfer.hold(f"waiting for all {self.args.clients} clients")
            return
        chosen = [c for c in transfer.clients if c in self._chosen]
        if chosen:
            transfer.clients = chosen
        else:
            transfer.hold(f"no client drawn for version {api.version}")

    def before_upload(self, api: Any, transfer: Any) -> None:
        if self._version == api.version and transfer.version == api.version and transfer.client not in self._chosen:
            transfer.discard(f"client {transfer.client} was not drawn for version {api.version}")

    def after_upload(self, api: Any, transfer: Any) -> None:
        if transfer.accepted and self._version == api.version and api.accepted >= len(self._chosen):
            api.aggregate()

    def after_aggregate(self, api: Any) -> None:
        if self.args.checkpoint:
            api.save_checkpoint(f"{self.args.checkpoint}.{api.version}")

    def uploads_needed(self, api: Any) -> Optional[int]:
        return len(self._chosen) if self._version == api.version else None


class Evaluate(ofl.Step):
    """Backend: the global model's test accuracy, training loss and per-client test accuracy after
    each version."""

    roles = frozenset({"backend"})

    def __init__(self, net: torch.nn.Module, dataset: Data, label: str) -> None:
        self.net, self.data, self.label = net, dataset, label
        self.history: List[Dict[str, Any]] = []

    def after_aggregate(self, api: Any) -> None:
        with torch.no_grad():
            accuracy = (self.net(self.data.x_test).argmax(1) == self.data.y_test).double().mean().item()
            loss = F.cross_entropy(self.net(self.data.x_train), self.data.y_train).item()
            per_client = [(self.net(x).argmax(1) == y).double().mean().item() for x, y in self.data.test if len(y)]
        self.history.append({"version": api.version, "accuracy": accuracy, "loss": loss, "clients": per_client})
        api.log.info(f"{self.label}: version {api.version} test accuracy {100 * accuracy:.2f} %, train loss {loss:.4f}")


# ----------------------------------------------------------------- the algorithms
def build_aggregator(args: argparse.Namespace, net: torch.nn.Module) -> Any:
    """The backend side of ``args.algorithm`` (built on every rank, as the script runs everywhere)."""
    params, name = net.parameters(), args.algorithm
    lr = args.server_lr
    if name in ("fedavg", "fedprox"):
        return aggregate.AverageAggregator(params)
    if name == "scaffold":
        return strategies.Scaffold(params, num_clients=args.clients, lr=1.0 if lr is None else lr)
    if name == "fednova":
        return strategies.FedNova(params)
    if name == "feddyn":
        return strategies.FedDyn(params, alpha=args.feddyn_alpha, num_clients=args.clients)
    if name == "qffl":
        return strategies.QFedAvg(params, q=args.q, lr=args.lr)
    if name == "fedavgm":
        return aggregate.Mean(params, server=aggregate.FedAvgM(lr=1.0 if lr is None else lr, momentum=args.server_momentum))
    if name == "fedadagrad":
        return aggregate.Mean(params, server=aggregate.FedAdagrad(lr=0.1 if lr is None else lr, tau=args.tau))
    if name == "fedadam":
        return aggregate.Mean(params, server=aggregate.FedAdam(lr=0.1 if lr is None else lr, tau=args.tau))
    if name == "fedyogi":
        return aggregate.Mean(params, server=aggregate.FedYogi(lr=0.1 if lr is None else lr, tau=args.tau))
    if name == "median":
        return aggregate.Median(params)
    if name == "trimmedmean":
        return aggregate.TrimmedMean(params, beta=args.trim)
    if name == "krum":
        return aggregate.Krum(params, f=args.f)
    if name == "multikrum":
        return aggregate.MultiKrum(params, f=args.f)
    if name == "bulyan":
        return aggregate.Bulyan(params, f=args.f if args.bulyan_f is None else args.bulyan_f)
    return aggregate.Mean(params, max_norm=args.max_norm)


def build_attack(args: argparse.Namespace) -> Optional[strategies.Attack]:
    malicious = range(args.malicious)
    if args.attack == "signflip":
        return strategies.SignFlip(malicious, scale=args.attack_scale)
    if args.attack == "scaled":
        return strategies.ScaledUpdate(malicious, factor=args.attack_scale)
    if args.attack == "gaussian":
        return strategies.GaussianUpdate(malicious, std=args.attack_scale)
    return None


def trainer(args: argparse.Namespace, api: ofl.API, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
            aggregator: Any, dataset: Data, states: Optional[ClientStates]) -> Callable[[Any], int]:
    """``train(client)`` for VirtualClients: the user's plain loop plus the algorithm's helper."""

    def train_one(client: Any) -> int:
        config = api.config
        x, y = dataset.train[int(client.id)]
        if args.algorithm == "qffl":  # q-FFL needs the loss of the downloaded model first
            with torch.no_grad():
                aggregator.client(F.cross_entropy(net(x), y).item())
        helper: Any = None
        if args.algorithm == "fedprox":
            helper = strategies.FedProx(net, mu=config["mu"])
        elif args.algorithm == "scaffold":
            helper = aggregator.client(lr=args.lr, state=states.get(client.id), version=client.version)
        elif args.algorithm == "feddyn":
            helper = aggregator.client(state=states.get(client.id), version=client.version)
        elif args.algorithm == "fednova":
            helper = aggregator.client(optimizer)
        for _ in range(config["epochs"][client.id]):
            for batch in torch.randperm(len(y), generator=client.generator).split(args.batch):
                optimizer.zero_grad()
                F.cross_entropy(net(x[batch]), y[batch]).backward()
                if helper is not None:
                    helper.correct_()
                optimizer.step()
        if args.algorithm in ("scaffold", "feddyn"):
            states[client.id] = helper.finish()
        elif args.algorithm == "fednova":
            helper.finish()
        return len(y)

    return train_one


def run(args: argparse.Namespace, address: Optional[ofl.Address] = None,
        hooks: Sequence[ofl.Step] = ()) -> Optional[List[Dict[str, Any]]]:
    """One rank of the federation; the backend returns the history of its versions."""
    ofl.logger.log_level(args.log)
    torch.set_num_threads(1)
    address = address or ofl.Address(args=args)
    frontend = address.rank > 0
    hosted = split_clients(range(args.clients), address.world_size - 1, address.rank - 1) if frontend else None
    api = ofl.API(frontend=frontend, clients=hosted, resume=args.resume, timeout=timedelta(minutes=5),
                  reconnect=timedelta(seconds=120), link_timeout=timedelta(seconds=args.link_timeout))
    dataset = Data(args)
    net = logistic_regression(dataset.features, args.seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
    aggregator = build_aggregator(args, net)
    evaluate = Evaluate(net, dataset, args.algorithm)
    with ofl.StepAt(api):
        Plan(args)
        ofl.StopAtVersion(max_version=args.rounds)
    api.register_step(evaluate)
    for step in hooks:
        api.register_step(step)
    api.build_connection(address=address)
    api.set_aggregator_and_optimizer(aggregator, optimizer)
    api.set_state_dict(net.state_dict(keep_vars=True))
    states = ClientStates() if args.algorithm in ("scaffold", "feddyn") else None
    with api:
        api.run()
        VirtualClients(api, net, trainer(args, api, net, optimizer, aggregator, dataset, states), optimizer=optimizer,
                       seed=args.seed, attack=build_attack(args)).run()
    api.finish()
    if frontend:
        return None
    if args.save:
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, args.save)
    if args.history:
        with open(args.history, "w") as out:
            json.dump(evaluate.history, out)
    return evaluate.history


def main(argv: Optional[Sequence[str]] = None) -> Optional[List[Dict[str, Any]]]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
