"""Seconds per round of a one-process simulation against a plain PyTorch loop doing the same work.

    python bench/simulation.py [--repeats 3] [--rounds 10] [--threads 1] [--config K:FRACTION ...]

Workload: MLP 784-200-200-10, 100 samples per client of FedProx's Synthetic(0.5, 0.5) with 784
features (all clients' data generated up front and held in memory), 1 local epoch, batch 32, SGD
lr 0.05, FedAvg weighted by samples. Configurations: K = 100 clients at fractions 1.0 and 0.1,
K = 1,000 at 0.1 (``--config 100:1.0`` runs only that one; repeat the option for several).

- ``api``: ``openfl_api.simulate.simulate`` with 2 ranks (a backend thread and one frontend
  thread hosting all K clients through ``VirtualClients``), ``ClientSampling`` and
  ``AggregateCount``, over memory:// pipes.
- ``plain``: the same FedAvg written by hand, no framework: per sampled client, load the global
  state_dict into one model, train, add ``num_samples * weights`` to a running sum; divide.

Both draw the same clients per round (numpy ``default_rng([seed, round])``) and the same batch
order per client. Each (configuration, mode, repeat) runs in a fresh child process, modes
alternating, so the peak RSS (``ru_maxrss``) is that mode's alone. A round is the time between two
aggregations (for the API, measured by a backend step); the first round is timed from the start
of the training loop. Steady state = median of rounds 2..N. Printed: medians over repeats with the
range of the per-repeat medians, the API / plain ratio (of the medians, and its range over
repeats), the same ratio in process CPU seconds (less sensitive to other load on the machine),
the first round, the API's round-to-round spread (std / mean) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

CONFIGS = [(100, 1.0), (100, 0.1), (1000, 0.1)]
SAMPLES, FEATURES, HIDDEN, BATCH, LR = 100, 784, 200, 32, 0.05


def mlp(seed: int):
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                              torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    from openfl_api.simulation import init_linear_

    return init_linear_(net, seed)


def sampled(clients: int, fraction: float, seed: int, version: int) -> List[int]:
    import numpy as np

    k = max(1, round(fraction * clients))
    return sorted(np.random.default_rng([seed, version]).choice(clients, size=k, replace=False).tolist())


def local_epoch(net, opt, x, y, generator) -> int:
    import torch
    import torch.nn.functional as F

    for batch in torch.randperm(len(y), generator=generator).split(BATCH):
        opt.zero_grad()
        F.cross_entropy(net(x[batch]), y[batch]).backward()
        opt.step()
    return len(y)


def run_plain(datasets, clients: int, fraction: float, rounds: int, seed: int) -> Dict[str, List[float]]:
    import torch
    from openfl_api.simulation import client_seed  # the same per-client seeds as the API run

    net = mlp(seed)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    marks = [(time.perf_counter(), time.process_time())]
    for version in range(rounds):
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        weight = 0
        for client in sampled(clients, fraction, seed, version):
            net.load_state_dict(global_state)
            generator = torch.Generator().manual_seed(client_seed(seed, version, client))
            n = local_epoch(net, opt, *datasets[client], generator)
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    total[k].add_(v, alpha=n)
            weight += n
        global_state = {k: v / weight for k, v in total.items()}
        marks.append((time.perf_counter(), time.process_time()))
    return _durations(marks)


def _durations(marks: List[Any]) -> Dict[str, List[float]]:
    """Wall and process CPU seconds between consecutive ``(perf_counter, process_time)`` marks."""
    marks = sorted(marks)
    return {"wall": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
            "cpu": [b[1] - a[1] for a, b in zip(marks, marks[1:])]}


def run_api(datasets, clients: int, fraction: float, rounds: int, seed: int) -> Dict[str, List[float]]:
    from datetime import timedelta

    import torch

    import openfl_api as ofl
    from openfl_api import aggregate
    from openfl_api.simulate import simulate
    from openfl_api.simulation import VirtualClients

    marks: List[float] = []

    class Mark(ofl.Step):
        roles = frozenset({"backend"})

        def after_aggregate(self, api) -> None:
            marks.append((time.perf_counter(), time.process_time()))

    def rank() -> None:
        args = ofl.parser.parse_args([])
        api = ofl.API(frontend=args.rank > 0, clients=range(clients) if args.rank > 0 else None)
        api.set_aggregate_triggers(ofl.AggregateCount(count=max(1, round(fraction * clients))))
        with ofl.StepAt(api):
            ofl.ClientSampling(fraction=fraction, seed=seed, min_clients=clients)
            ofl.StopAtVersion(max_version=rounds)
            Mark()
        api.build_connection(address=ofl.Address(args=args))
        net = mlp(seed)
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), opt)
        api.set_state_dict(net.state_dict(keep_vars=True))

        def train(client) -> int:
            return local_epoch(net, opt, *datasets[int(client.id)], client.generator)

        with api:
            api.run()
            if args.rank > 0:
                marks.append((time.perf_counter(), time.process_time()))  # round 1 starts
                VirtualClients(api, net, train, seed=seed).run()
        api.finish()

    simulate(rank, nproc_per_node=2, timeout=timedelta(minutes=10))
    return _durations(marks)


def child(options: argparse.Namespace) -> None:
    import torch

    import openfl_api as ofl
    from openfl_api import data

    torch.set_num_threads(options.threads)
    ofl.logger.log_level("WARNING")  # loguru's default sink would format every DEBUG line
    datasets = data.synthetic(options.clients, 0.5, 0.5, seed=options.seed, samples_per_client=SAMPLES,
                              num_features=FEATURES)
    run = run_api if options.child == "api" else run_plain
    rounds = run(datasets, options.clients, options.fraction, options.rounds, options.seed)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rounds": rounds, "rss_mb": rss_mb}))


def spread(values: List[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def parent(options: argparse.Namespace) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    print(f"bench/simulation.py: {options.repeats} repeats x {options.rounds} rounds, torch threads "
          f"{options.threads}, load average at start {os.getloadavg()[0]:.1f}")
    results: Dict[Any, Dict[str, List[Dict[str, Any]]]] = {}
    for clients, fraction in options.config or CONFIGS:
        results[(clients, fraction)] = {"api": [], "plain": []}
        for repeat in range(options.repeats):
            for mode in (("api", "plain") if repeat % 2 == 0 else ("plain", "api")):
                command = [sys.executable, __file__, "--child", mode, "--clients", str(clients), "--fraction",
                           str(fraction), "--rounds", str(options.rounds), "--threads", str(options.threads),
                           "--seed", str(options.seed)]
                out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
                if out.returncode != 0:
                    sys.exit(f"child {mode} K={clients} f={fraction} failed:\n{out.stderr[-3000:]}")
                results[(clients, fraction)][mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"load average at end {os.getloadavg()[0]:.1f}\n")
    print("Seconds per round; steady = median of rounds 2..N per run, then the median over runs with the range "
          "of the per-run medians in brackets; CPU = process CPU seconds per round (all threads).\n")
    print("| K | fraction | clients/round | API steady | plain steady | API / plain (per-run range) | "
          "API / plain CPU | first round API / plain | API round spread | peak RSS MB API / plain |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for (clients, fraction), modes in results.items():
        steady = {m: [statistics.median(r["rounds"]["wall"][1:]) for r in runs] for m, runs in modes.items()}
        cpu = {m: [statistics.median(r["rounds"]["cpu"][1:]) for r in runs] for m, runs in modes.items()}
        first = {m: [r["rounds"]["wall"][0] for r in runs] for m, runs in modes.items()}
        rss = {m: max(r["rss_mb"] for r in runs) for m, runs in modes.items()}
        ratios = [a / p for a, p in zip(steady["api"], steady["plain"])]
        ratio = statistics.median(steady["api"]) / statistics.median(steady["plain"])
        cpu_ratio = statistics.median(cpu["api"]) / statistics.median(cpu["plain"])
        per_round = [x for r in modes["api"] for x in r["rounds"]["wall"][1:]]
        noise = statistics.pstdev(per_round) / statistics.mean(per_round)
        print(f"| {clients} | {fraction} | {max(1, round(fraction * clients))} | {spread(steady['api'])} | "
              f"{spread(steady['plain'])} | {ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {cpu_ratio:.2f} | "
              f"{statistics.median(first['api']):.3f} / {statistics.median(first['plain']):.3f} | "
              f"{noise:.0%} | {rss['api']:.0f} / {rss['plain']:.0f} |")


def config(text: str) -> Tuple[int, float]:
    """``"K:FRACTION"`` -> ``(K, FRACTION)``, for ``--config``."""
    clients, _, fraction = text.partition(":")
    try:
        k, f = int(clients), float(fraction)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:FRACTION such as 100:1.0, got {text!r}") from None
    if k < 1 or not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"K must be >= 1 and FRACTION in (0, 1], got {text!r}")
    return k, f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each child (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=config, action="append",
                        help="K:FRACTION, e.g. 100:1.0; repeatable (default: all three configurations)")
    parser.add_argument("--child", choices=("api", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options)
    else:
        parent(options)


if __name__ == "__main__":
    main()
