"""Partitioner benchmark: time to split 60,000 labels (MNIST-sized) among 100 clients.

    python bench/partition.py                    # 7 repeats per case, a few seconds
    python bench/partition.py --samples 600000 --clients 1000 --repeats 3

Each case runs ``--repeats`` times on the same labels (10 classes, drawn uniformly with seed 0)
with seeds 0, 1, ...; reported are the median and the worst wall time (``time.perf_counter``),
and the median as a ratio to the reference, ``numpy.random.default_rng(0).permutation(n)``, the
least any random split of ``n`` samples must do. The case to watch is Dirichlet with
``alpha=0.01``: most clients start empty and are repaired, never resampled, so it must finish
(well under a second) however small alpha is. Nothing here is asserted; the tests check
correctness, this file only reports speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from openfl_api import data  # noqa: E402  (needs the path above)


def timings(run: Callable[[int], object], repeats: int) -> List[float]:
    """Wall time of ``run(seed)`` for seeds ``0 .. repeats - 1``, after one warm-up call."""
    run(repeats)
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        run(seed)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    n, clients = args.samples, args.clients
    labels = np.random.default_rng(0).integers(0, args.classes, n)

    cases = {
        "permutation (reference)": lambda seed: np.random.default_rng(seed).permutation(n),
        "iid": lambda seed: data.iid(n, clients, seed=seed),
        "dirichlet alpha=0.01": lambda seed: data.dirichlet(labels, clients, 0.01, seed=seed),
        "dirichlet alpha=0.01 min_size=10": lambda seed: data.dirichlet(labels, clients, 0.01, seed=seed, min_size=10),
        "dirichlet alpha=0.5": lambda seed: data.dirichlet(labels, clients, 0.5, seed=seed),
        "shards 2 per client": lambda seed: data.shards(labels, clients, 2, seed=seed),
        "labels_per_client=2": lambda seed: data.shards(labels, clients, labels_per_client=2, seed=seed),
        "lognormal_quantity sigma=1": lambda seed: data.lognormal_quantity(n, clients, 1.0, seed=seed),
        "powerlaw_quantity exponent=2": lambda seed: data.powerlaw_quantity(n, clients, 2.0, seed=seed),
    }
    print(f"{n} labels ({args.classes} classes), {clients} clients, {args.repeats} repeats; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'case':<36}{'median ms':>11}{'worst ms':>10}{'x reference':>13}")
    reference = None
    for name, run in cases.items():
        times = timings(run, args.repeats)
        median = statistics.median(times)
        reference = reference or median
        print(f"{name:<36}{median * 1e3:>11.2f}{max(times) * 1e3:>10.2f}{median / reference:>13.1f}")


if __name__ == "__main__":
    main()
