"""Seconds per round of a one-process simulation against a plain PyTorch loop doing the same work.

    python bench/simulation.py [--repeats 3] [--rounds 10] [--threads 1] [--config K:FRACTION ...] [--modes MODE ...]

Workload: MLP 784-200-200-10, 100 samples per client of FedProx's Synthetic(0.5, 0.5) with 784
features (all clients' data generated up front and held in memory), 1 local epoch, batch 32, SGD
lr 0.05, FedAvg weighted by samples. Configurations: K = 100 clients at fractions 1.0 and 0.1,
K = 1,000 at 0.1 (``--config 100:1.0`` runs only that one; repeat the option for several).

- ``api``: ``openfl_api.simulate.simulate`` with 2 ranks (a backend thread and one frontend
  thread hosting all K clients through ``VirtualClients``), ``ClientSampling`` and
  ``AggregateCount``, over memory:// pipes.
- ``float32``: the same as ``api`` with the aggregator's sum replaced by a float32 running sum
  in arrival order (``torch._foreach_add_``), which is fast but whose bits depend on the order of
  the uploads: ``api / float32`` is what the order-free sum (``ExactSum``) costs.
- ``plain``: the same FedAvg written by hand, no framework: per sampled client, load the global
  state_dict into one model, train, add ``num_samples * weights`` to a running sum; divide.
- ``record`` and ``unrecorded``: ``api`` writing the record of the run to a file
  (``API(record=...)``, evaluation off) and ``api`` keeping no record at all
  (``API(record=False)``): ``record / unrecorded`` is what recording costs. (``api`` itself keeps
  the record in memory, for the report table.)

Both draw the same clients per round (numpy ``default_rng([seed, round])``) and the same batch
order per client. Each (configuration, repeat) starts one fresh child process per mode, so the
peak RSS (``ru_maxrss``) is that mode's alone, and runs them **in lockstep**: the parent lets one
child run one round while the others wait (blocked on a pipe, using no CPU), then the next, the
order rotating every round. The speed of this machine drifts by 30 % within minutes; paired
rounds a few tenths of a second apart see the same drift, so their ratio is steady where the
ratio of two separate runs is not. A round is the time from the parent's go to the next
aggregation (for the API, marked by a backend step); the first round includes the first download.

Printed per configuration: the steady-state round (median of rounds 2..N over all repeats) of
each mode; the ratios API / plain, API / float32 and record / unrecorded, each the median of the
paired per-round ratios (with the range of the per-repeat medians), and the same in process CPU
seconds (less sensitive to other load on the machine than wall time); the first round; the first
mode's round-to-round spread (std / mean) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

CONFIGS = [(100, 1.0), (100, 0.1), (1000, 0.1)]
MODES = ("api", "float32", "plain", "record", "unrecorded")
SAMPLES, FEATURES, HIDDEN, BATCH, LR = 100, 784, 200, 32, 0.05


def mlp(seed: int):
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                              torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    from openfl_api.virtual_clients import init_linear_

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


class Gate:
    """A child's side of the lockstep: wait for the parent's ``go`` before each round, report each
    round's wall and process CPU seconds when it ends (one JSON line each on stdout)."""

    def __init__(self) -> None:
        self.started = (0.0, 0.0)

    def start(self) -> None:
        """Before the first round: say the child is ready, then wait for the go."""
        print("ready", flush=True)
        self._wait()

    def done(self) -> None:
        """A round ended: report it, then wait for the go of the next one (or the end)."""
        wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
        self._wait()

    def _wait(self) -> None:
        if sys.stdin.readline().strip() not in ("go", "end"):
            raise SystemExit("the parent went away")
        self.started = (time.perf_counter(), time.process_time())


def run_plain(datasets, clients: int, fraction: float, rounds: int, seed: int, gate: Gate) -> None:
    import torch
    from openfl_api.virtual_clients import client_seed  # the same per-client seeds as the API run

    net = mlp(seed)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    gate.start()
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
        gate.done()


def float32_average(params):
    """FedAvg whose running sum is float32 in arrival order: the aggregator's sum before the
    order-free ``ExactSum``, kept here only to measure what the exact sum costs."""
    import math

    import torch

    from openfl_api import aggregate

    class Float32Average(aggregate.AverageAggregator):
        def add(self, tensors, num_samples, weight=1.0, peak=None):
            effective = float(self.effective_weight(num_samples, weight))
            if not self._count:
                self._float32 = {n: torch.zeros(t.shape) for n, t in tensors.items()}
                self._dtypes = {n: t.dtype for n, t in tensors.items()}
            torch._foreach_add_(list(self._float32.values()), list(tensors.values()), alpha=effective)
            self._count += 1
            self._weights.append(effective)

        def aggregate(self, current):
            total = math.fsum(self._weights)
            result = {n: (s / total).to(current[n].dtype if n in current else self._dtypes[n])
                      for n, s in self._float32.items()}
            self.reset()
            return result

    return Float32Average(params)


def run_api(datasets, clients: int, fraction: float, rounds: int, seed: int, gate: Gate, exact: bool = True,
            record=None) -> None:
    from datetime import timedelta

    import torch

    import openfl_api as ofl
    from openfl_api import aggregate
    from openfl_api.simulate import simulate
    from openfl_api.virtual_clients import VirtualClients

    class Mark(ofl.Step):
        roles = frozenset({"backend"})

        def after_aggregate(self, api) -> None:
            gate.done()  # the serve loop waits here for the next round's go

    def rank() -> None:
        args = ofl.parser.parse_args([])
        api = ofl.API(frontend=args.rank > 0, clients=range(clients) if args.rank > 0 else None, record=record)
        api.set_aggregate_triggers(ofl.AggregateCount(count=max(1, round(fraction * clients))))
        with ofl.StepAt(api):
            ofl.ClientSampling(fraction=fraction, seed=seed, min_clients=clients)
            ofl.StopAtVersion(max_version=rounds)
            Mark()
        api.build_connection(address=ofl.Address(args=args))
        net = mlp(seed)
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        average = aggregate.AverageAggregator if exact else float32_average
        api.set_aggregator_and_optimizer(average(net.parameters()), opt)
        api.set_state_dict(net.state_dict(keep_vars=True))

        def train(client) -> int:
            return local_epoch(net, opt, *datasets[int(client.id)], client.generator)

        with api:
            api.run()
            if args.rank > 0:
                gate.start()
                VirtualClients(api, net, train, seed=seed).run()
        api.finish()

    simulate(rank, nproc_per_node=2, timeout=timedelta(minutes=10))


def child(options: argparse.Namespace) -> None:
    import torch

    import openfl_api as ofl
    from openfl_api import data

    torch.set_num_threads(options.threads)
    ofl.logger.log_level("WARNING")  # loguru's default sink would format every DEBUG line
    datasets = data.synthetic(options.clients, 0.5, 0.5, seed=options.seed, samples_per_client=SAMPLES,
                              num_features=FEATURES)
    arguments = (datasets, options.clients, options.fraction, options.rounds, options.seed, Gate())
    if options.child == "plain":
        run_plain(*arguments)
    elif options.child in ("record", "unrecorded"):
        with tempfile.TemporaryDirectory(prefix="bench-record-") as folder:
            run_api(*arguments, record=f"{folder}/run.jsonl" if options.child == "record" else False)
    else:
        run_api(*arguments, exact=options.child != "float32")
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


class Child:
    """One child process of the lockstep, with a deadline on every line it owes."""

    def __init__(self, mode: str, command: List[str], env: Dict[str, str]) -> None:
        self.mode = mode
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)

    def line(self, timeout: float = 900.0) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        text = self.process.stdout.readline() if ready else ""
        if not text:
            self.process.kill()
            error = self.process.communicate(timeout=30)[1]
            with tempfile.NamedTemporaryFile("w", prefix=f"bench-{self.mode}-", suffix=".err", delete=False) as kept:
                kept.write(error)
            sys.exit(f"child {self.mode} failed or timed out (its whole stderr: {kept.name}):\n{error[-3000:]}")
        return text.strip()

    def say(self, word: str) -> None:
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=30)


def lockstep(options: argparse.Namespace, clients: int, fraction: float, env: Dict[str, str]) -> Dict[str, Any]:
    """Run the modes of one configuration in lockstep; each mode's rounds and peak RSS."""
    children = {}
    try:
        for mode in options.modes:
            command = [sys.executable, __file__, "--child", mode, "--clients", str(clients), "--fraction",
                       str(fraction), "--rounds", str(options.rounds), "--threads", str(options.threads),
                       "--seed", str(options.seed)]
            children[mode] = Child(mode, command, env)
        for child_ in children.values():
            if child_.line() != "ready":
                sys.exit(f"child {child_.mode} did not get ready")
        modes = tuple(options.modes)
        rounds: Dict[str, List[Dict[str, float]]] = {mode: [] for mode in modes}
        for number in range(options.rounds):
            for mode in modes[number % len(modes):] + modes[:number % len(modes)]:
                children[mode].say("go")
                rounds[mode].append(json.loads(children[mode].line()))
        result = {}
        for mode, child_ in children.items():
            child_.say("end")
            result[mode] = {"rounds": rounds[mode], "rss_mb": json.loads(child_.line())["rss_mb"]}
        return result
    finally:
        for child_ in children.values():
            child_.close()


def parent(options: argparse.Namespace) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    print(f"bench/simulation.py: {options.repeats} repeats x {options.rounds} rounds in lockstep, torch threads "
          f"{options.threads}, load average at start {os.getloadavg()[0]:.1f}")
    results = {}
    for clients, fraction in options.config or CONFIGS:
        results[(clients, fraction)] = [lockstep(options, clients, fraction, env) for _ in range(options.repeats)]
    print(f"load average at end {os.getloadavg()[0]:.1f}\n")
    print("Seconds per round; steady = median of rounds 2..N over all repeats with the range of the per-repeat "
          "medians in brackets; API / plain = median of the paired per-round ratios (rounds 2..N), with the range "
          "of the per-repeat medians; CPU = process CPU seconds (all threads).\n")
    modes = tuple(options.modes)
    ratios = [(a, b, label) for a, b, label in (("api", "plain", "API / plain"), ("api", "float32", "API / float32 sum"),
                                                ("record", "unrecorded", "record / unrecorded"))
              if a in modes and b in modes]
    columns = (["K", "fraction", "clients/round"] + [f"{m} steady" for m in modes]
               + [f"{label} (per-repeat range)" for _, _, label in ratios] + [f"{label} CPU" for _, _, label in ratios]
               + ["first round " + " / ".join(modes), f"{modes[0]} round spread", "peak RSS MB " + " / ".join(modes)])
    print("| " + " | ".join(columns) + " |")
    print("|" + "--:|" * len(columns))
    for (clients, fraction), repeats in results.items():
        def steady(mode: str, key: str = "wall") -> List[List[float]]:
            return [[r[key] for r in run[mode]["rounds"][1:]] for run in repeats]

        def paired(mode: str, over: str, key: str = "wall") -> List[List[float]]:
            return [[a / b for a, b in zip(one, other)] for one, other in zip(steady(mode, key), steady(over, key))]

        def summary(runs: List[List[float]], digits: int = 3) -> str:
            per_repeat = [statistics.median(run) for run in runs]
            return (f"{statistics.median(x for run in runs for x in run):.{digits}f} "
                    f"({min(per_repeat):.{digits}f}-{max(per_repeat):.{digits}f})")

        flat = {mode: [x for run in steady(mode) for x in run] for mode in modes}
        first = {mode: statistics.median(run[mode]["rounds"][0]["wall"] for run in repeats) for mode in modes}
        rss = {mode: max(run[mode]["rss_mb"] for run in repeats) for mode in modes}
        noise = statistics.pstdev(flat[modes[0]]) / statistics.mean(flat[modes[0]])
        cells = [str(clients), str(fraction), str(max(1, round(fraction * clients)))]
        cells += [summary(steady(mode)) for mode in modes]
        cells += [summary(paired(a, b), 4 if a == "record" else 3) for a, b, _ in ratios]
        cells += [f"{statistics.median(x for run in paired(a, b, 'cpu') for x in run):.{4 if a == 'record' else 2}f}"
                  for a, b, _ in ratios]
        cells += [" / ".join(f"{first[m]:.3f}" for m in modes), f"{noise:.0%}", " / ".join(f"{rss[m]:.0f}" for m in modes)]
        print("| " + " | ".join(cells) + " |")


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
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="the modes to run in lockstep (default: all)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options)
    else:
        parent(options)


if __name__ == "__main__":
    main()
