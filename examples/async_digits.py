"""Synchronous FedAvg against FedAsync and FedBuff on scikit-learn's digits, 10 clients.

    python examples/async_digits.py [--rounds 40]

One process: the backend and 10 frontends run as threads over a ``memory://`` address, through the
same API, steps and aggregators as a launched federation. Each client holds an IID tenth of the
training split and trains an MLP 64-32-10 for one local epoch (batch 16, SGD lr 0.3) per update.
In the asynchronous runs client ``c`` sleeps ``2 * c`` ms per update, so the clients drift apart
and updates arrive stale. Every mode gets the same number of client updates,
``10 * rounds``: synchronous FedAvg aggregates 10 per version, FedAsync 1 (``AggregateCount(1)``),
FedBuff 5 (``AggregateCount(5)``). Both asynchronous runs weight updates by the polynomial
staleness function ``(d + 1) ** -0.5``; FedAsync mixes with ``alpha = 0.6`` (FedAsync's
experiments), FedBuff with ``alpha = 1`` (FedBuff's server learning rate of 1). Printed: the test accuracy of the final global model per mode
and the staleness seen by the asynchronous runs. Needs scikit-learn (``pip install openfl_api[digits]``).
"""

from __future__ import annotations

import argparse
import threading
import uuid
from datetime import timedelta
from typing import Dict, List, Optional

import torch

import openfl_api as ofl
from openfl_api import aggregate, data

CLIENTS = 10


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


class Staleness(ofl.Step):
    """Records the staleness of each accepted update (backend)."""

    roles = frozenset({"backend"})

    def __init__(self) -> None:
        self.seen: List[int] = []

    def after_upload(self, api, transfer) -> None:
        if transfer.accepted:
            self.seen.append(transfer.staleness)


ALPHA = {"fedavg": 1.0, "fedasync": 0.6, "fedbuff": 1.0}


def run(mode: str, rounds: int = 40, seed: int = 0, lr: float = 0.3) -> Dict[str, object]:
    """Train with ``mode`` in {"fedavg", "fedasync", "fedbuff"}; return accuracy and staleness."""
    alpha = ALPHA[mode]
    torch.manual_seed(seed)
    digits = data.load_digits(seed=seed)
    parts = data.iid(len(digits.y_train), CLIENTS, seed=seed)
    name = f"memory://digits-{mode}-{uuid.uuid4().hex[:8]}"
    asynchronous = None if mode == "fedavg" else ofl.Asynchronous(alpha=alpha, staleness=aggregate.Polynomial(0.5),
                                                                   max_staleness=None)
    count = {"fedavg": CLIENTS, "fedasync": 1, "fedbuff": 5}[mode]
    updates = CLIENTS * rounds
    timeouts = dict(timeout=timedelta(seconds=120), connect_timeout=timedelta(seconds=60),
                    drain=timedelta(seconds=5), tick=timedelta(milliseconds=5), token="digits")

    backend = ofl.API(frontend=False, asynchronous=asynchronous, **timeouts)
    staleness = Staleness()
    backend.set_aggregate_triggers(ofl.AggregateCount(count=count))
    backend.register_step(ofl.StopAtVersion(max_version=updates // count))
    backend.register_step(staleness)
    backend.build_connection(address=ofl.Address(init_method=name, world_size=CLIENTS + 1, rank=0))
    global_net = mlp()
    backend.set_aggregator_and_optimizer(aggregate.AverageAggregator(global_net.parameters()))
    backend.set_state_dict(global_net.state_dict(keep_vars=True))
    errors: List[BaseException] = []

    def client(index: int) -> None:
        api = ofl.API(frontend=True, **timeouts)
        try:
            api.build_connection(address=ofl.Address(init_method=name, world_size=CLIENTS + 1, rank=index + 1))
            net = mlp()
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), opt)
            api.set_state_dict(net.state_dict(keep_vars=True))
            x, y = digits.x_train[parts[index]], digits.y_train[parts[index]]
            generator = torch.Generator().manual_seed(seed * 1000 + index)
            while api.download():
                for batch in torch.randperm(len(y), generator=generator).split(16):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
                    opt.step()
                if asynchronous is not None:
                    threading.Event().wait(0.002 * index)  # clients of different speeds
                if not api.upload(num_samples=len(y)):
                    break
                api.update_version()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            api.finish()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    backend.start()
    backend.finish()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    with torch.no_grad():
        accuracy = (global_net(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    return {"accuracy": accuracy, "versions": backend.version, "staleness": staleness.seen}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="client updates per client (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ofl.logger.log_level("WARNING")
    for mode in ("fedavg", "fedasync", "fedbuff"):
        result = run(mode, args.rounds, args.seed)
        seen = result["staleness"]
        mean = sum(seen) / len(seen) if seen else 0.0
        print(f"{mode:9s} accuracy {100 * result['accuracy']:.2f} %  versions {result['versions']:4d}  "
              f"updates {len(seen)}  staleness mean {mean:.2f} max {max(seen, default=0)}")


if __name__ == "__main__":
    main()
