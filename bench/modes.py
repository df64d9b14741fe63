"""Seconds per round of the same federation in every mode: a plain PyTorch loop, ``simulate``, and
the launcher with 1, 2 and 4 frontend processes.

    python bench/modes.py [--repeats 2] [--rounds 8] [--config K:FRACTION ...] [--modes plain,simulate,launch2]
    python bench/modes.py --block 3 --rounds 10     # 3 rounds per turn, the first of each left out
    python bench/modes.py --baseline /path/to/other/checkout [--baseline-modes simulate,launch2]

Workload (the same in every mode): MLP 784-200-200-10, 100 samples per client of FedProx's
Synthetic(0.5, 0.5) drawn from ``(seed, client id)`` before the first round, one local epoch,
batch 32, SGD lr 0.05, FedAvg weighted by samples, ``ClientSampling`` of ``FRACTION`` of ``K``
clients per version. Configurations: K = 10 and K = 100 with every client, K = 100 at 10 %.

- ``plain``: FedAvg by hand, no framework, one process with one torch thread: per sampled client,
  load the global state_dict, train, add ``num_samples * weights`` to a running float32 sum.
- ``simulate``: ``python -m openfl_api.simulate --nproc_per_node 2`` (a backend thread and one
  frontend thread hosting every client over memory:// pipes).
- ``launchN``: ``python -m openfl_api.launch --nproc_per_node N+1``: a backend process and N
  frontend processes sharing the clients (``split_clients``) over gloo pipes; the launcher gives
  every rank ``OMP_NUM_THREADS=1``.

Every mode draws the same clients per version and the same batch order per client, so the API
modes give the same weights bit for bit (the exact sum does not depend on the order of arrival);
the plain loop's float32 running sum does, so its checksum differs.

The modes run **in lockstep**: each gates its rounds on the parent over a local socket (the plain
loop after its average, the API's backend in an ``after_aggregate`` step, which holds the serve
loop and so every frontend), and the parent lets one mode run one round while the others wait,
the order rotating every round. This machine's speed drifts within minutes; rounds of different
modes a few tenths of a second apart see the same drift. A round is the time from the parent's go
to the next aggregation; round 1 (joins, first download) runs unpaced and is left out.
``--block B`` lets each mode run B rounds per turn and leaves the first of them out too: it
warms the caches that the other modes' rounds took over (the launcher's modes, of three or five
processes, lose the most to that), so the figures are those of rounds run back to back.

``--baseline DIR`` adds, for each of ``--baseline-modes``, the same mode run with the
``openfl_api`` of another checkout (``MODE@base``), in the same lockstep: a before/after
comparison within one run.

Printed per configuration and mode: the steady round (median of the counted rounds over all repeats,
with the range of the per-repeat medians), the ratio to the plain loop (median of the paired
per-round ratios, with the per-repeat range), the CPU seconds of all the mode's processes per
round and its ratio to the plain loop's (on a loaded machine the scheduler gives a mode of many
threads more of the cores than a one-thread loop, so wall-clock ratios flatter it there), the peak
PSS of all the mode's processes together and the SHA-256 of the final weights (first 12 hex digits).

PSS is sampled every 50 ms during round 1 only (joins, the first download, every client's upload,
the first aggregation and the encoding of version 2: every buffer the later rounds reuse is
allocated by then), and once more as it ends. Reading a process's PSS (``smaps_rollup``) walks its
page tables under its memory-map lock and holds up that process's own allocations meanwhile:
sampled during the timed rounds, it slowed the launcher's modes (three or five processes) by about
a quarter and the one-process modes barely, so the timed rounds run unsampled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(10, 1.0), (100, 1.0), (100, 0.1)]
MODES = ("plain", "simulate", "launch1", "launch2", "launch4")
SAMPLES, FEATURES, HIDDEN, BATCH, LR = 100, 784, 200, 32, 0.05
GATE_VAR = "OPENFL_BENCH_GATE"


# ----------------------------------------------------------------- the workload, in every mode
def mlp(seed: int):
    import torch

    from openfl_api.virtual_clients import init_linear_

    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                              torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    return init_linear_(net, seed)


def client_data(clients, seed: int) -> Dict[int, Any]:
    """(x, y) of each client id, drawn from (seed, id): the same whoever hosts the client."""
    import numpy as np

    from openfl_api import data

    out = {}
    for client in clients:
        ((x, y),) = data.synthetic(1, 0.5, 0.5, seed=np.random.default_rng([seed, int(client)]),
                                   samples_per_client=SAMPLES, num_features=FEATURES)
        out[int(client)] = (x, y)
    return out


def local_epoch(net, opt, x, y, generator) -> int:
    import torch
    import torch.nn.functional as F

    for batch in torch.randperm(len(y), generator=generator).split(BATCH):
        opt.zero_grad()
        F.cross_entropy(net(x[batch]), y[batch]).backward()
        opt.step()
    return len(y)


def checksum(state) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


class Gate:
    """The gating side of a mode: reports each round (wall seconds) to the parent and waits for its go."""

    def __init__(self) -> None:
        host, port = os.environ[GATE_VAR].rsplit(":", 1)
        self._socket = socket.create_connection((host, int(port)), timeout=600)
        self._file = self._socket.makefile("rw")
        self._started = time.perf_counter()

    def done(self, last: bool = False) -> None:
        """A round ended: report it, then wait for the go of the next one (unless it was the last)."""
        self.say({"wall": time.perf_counter() - self._started})
        if last:
            return
        if self._file.readline().strip() != "go":
            raise SystemExit("the bench's parent went away")
        self._started = time.perf_counter()

    def say(self, fields: Dict[str, Any]) -> None:
        self._file.write(json.dumps(fields) + "\n")
        self._file.flush()


def run_plain(options: argparse.Namespace) -> None:
    import torch

    from openfl_api.virtual_clients import client_seed

    torch.set_num_threads(1)
    datasets = client_data(range(options.clients), options.seed)
    net = mlp(options.seed)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    gate = Gate()
    for version in range(options.rounds):
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        weight = 0
        for client in sampled(options.clients, options.fraction, options.seed, version):
            net.load_state_dict(global_state)
            generator = torch.Generator().manual_seed(client_seed(options.seed, version, client))
            n = local_epoch(net, opt, *datasets[client], generator)
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    total[k].add_(v, alpha=n)
            weight += n
        global_state = {k: v / weight for k, v in total.items()}
        gate.done(last=version + 1 == options.rounds)
    gate.say({"wall": 0.0, "checksum": checksum(global_state)})


def sampled(clients: int, fraction: float, seed: int, version: int) -> List[int]:
    """The clients ``ClientSampling(fraction, seed)`` draws at ``version`` (from the ids in sorted order)."""
    import numpy as np

    ids = sorted(str(c) for c in range(clients))
    k = max(1, round(fraction * clients))
    picked = np.sort(np.random.default_rng([seed, version]).choice(clients, size=k, replace=False))
    return [int(ids[i]) for i in picked]


def run_api() -> None:
    """One rank of the API modes (under ``openfl_api.simulate`` or ``openfl_api.launch``)."""
    import torch

    import openfl_api as ofl
    from openfl_api import aggregate
    from openfl_api.virtual_clients import VirtualClients, split_clients

    parser = ofl.parser.build_parser()
    parser.add_argument("--api", action="store_true")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--fraction", type=float)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ofl.logger.log_level("WARNING")
    hosted = split_clients(range(args.clients), args.world_size - 1, args.rank - 1) if args.rank > 0 else None
    datasets = client_data(hosted or (), args.seed)
    gate: List[Gate] = []

    class Mark(ofl.Step):
        roles = frozenset({"backend"})

        def after_aggregate(self, api) -> None:
            if not gate:
                gate.append(Gate())
            # The serve loop, and so every frontend, waits here for the go of the next round.
            gate[0].done(last=api.version >= args.rounds)

    api = ofl.API(frontend=args.rank > 0, clients=hosted)
    api.set_aggregate_triggers(ofl.AggregateCount(count=max(1, round(args.fraction * args.clients))))
    with ofl.StepAt(api):
        ofl.ClientSampling(fraction=args.fraction, seed=args.seed, min_clients=args.clients)
        ofl.StopAtVersion(max_version=args.rounds)
        Mark()
    api.build_connection(address=ofl.Address(args=args))
    net = mlp(args.seed)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), opt)
    api.set_state_dict(net.state_dict(keep_vars=True))

    def train(client) -> int:
        return local_epoch(net, opt, *datasets[int(client.id)], client.generator)

    with api:
        api.run()
        if args.rank > 0:
            VirtualClients(api, net, train, seed=args.seed).run()
    api.finish()
    if args.rank == 0:
        gate[0].say({"wall": 0.0, "checksum": checksum(net.state_dict())})


# ----------------------------------------------------------------- the parent
def tree(pid: int) -> List[int]:
    """``pid`` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every process below it (live ones)."""
    total = 0
    for member in tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / TICK


def pss_mb(pid: int) -> float:
    total = 0
    for member in tree(pid):
        try:
            with open(f"/proc/{member}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


class Mode:
    """One mode's process tree, its gate connection, and its peak PSS."""

    def __init__(self, mode: str, options: argparse.Namespace, clients: int, fraction: float) -> None:
        self.mode = mode
        mode, _, base = mode.partition("@")
        root = Path(options.baseline).resolve() if base else ROOT
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(1.0)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "OPENFL_", "MASTER_"))}
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        env[GATE_VAR] = f"127.0.0.1:{self.listener.getsockname()[1]}"
        env["OMP_NUM_THREADS"] = "1"
        shared = ["--clients", str(clients), "--fraction", str(fraction), "--rounds", str(options.rounds),
                  "--seed", str(options.seed)]
        if mode == "plain":
            command = [sys.executable, __file__, "--child", "plain", *shared]
        elif mode == "simulate":
            command = [sys.executable, "-m", "openfl_api.simulate", "--nproc_per_node", "2", __file__, "--api", *shared]
        else:
            command = [sys.executable, "-m", "openfl_api.launch", "--nproc_per_node", str(int(mode[6:]) + 1),
                       __file__, "--api", *shared]
        self.log = open(Path(options.logs) / f"{self.mode}-{clients}-{fraction}.log", "w")
        self.process = subprocess.Popen(command, env=env, cwd=root, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.file: Any = None
        self.peak = 0.0
        self._sampling = threading.Event()
        self._sampling.set()  # cleared once round 1 ends, or when the mode is closed
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        # Round 1 only: reading smaps_rollup walks a process's page tables under its memory-map
        # lock, which holds up the process's own allocations; sampled during the timed rounds it
        # slowed the modes of many processes by a quarter.
        while self._sampling.is_set():
            self.peak = max(self.peak, pss_mb(self.process.pid))
            time.sleep(0.05)

    def first_round(self) -> float:
        """Round 1's wall time, once the mode reported it; PSS sampling ends with it."""
        wall = self.line()["wall"]
        self.peak = max(self.peak, pss_mb(self.process.pid))
        self._sampling.clear()
        return wall

    def line(self) -> Dict[str, Any]:
        if self.file is None:
            self.file = self._accept()
        text = self.file.readline()
        if not text:
            sys.exit(f"mode {self.mode} ended before it reported (see its log in {self.log.name})")
        return json.loads(text)

    def _accept(self, limit: float = 600.0) -> Any:
        """The mode's gate connection; exits naming its log if the mode ends or ``limit`` seconds pass first."""
        deadline = time.monotonic() + limit
        while True:
            try:
                connection, _ = self.listener.accept()
                connection.settimeout(None)
                return connection.makefile("rw")
            except socket.timeout:
                if self.process.poll() is not None:
                    sys.exit(f"mode {self.mode} exited with code {self.process.returncode} before its first round "
                             f"(see its log in {self.log.name})")
                if time.monotonic() > deadline:
                    sys.exit(f"mode {self.mode} did not report its first round within {limit:.0f} s "
                             f"(see its log in {self.log.name})")

    def go(self) -> None:
        self.file.write("go\n")
        self.file.flush()

    def close(self) -> None:
        self._sampling.clear()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.log.close()


def lockstep(options: argparse.Namespace, clients: int, fraction: float) -> Dict[str, Any]:
    modes = {mode: Mode(mode, options, clients, fraction) for mode in all_modes(options)}
    try:
        rounds: Dict[str, List[float]] = {mode: [] for mode in modes}
        cpu: Dict[str, List[float]] = {mode: [0.0] for mode in modes}
        for mode in modes.values():
            rounds[mode.mode].append(mode.first_round())  # round 1, unpaced
        counted: Dict[str, List[bool]] = {mode: [False] for mode in modes}
        names = list(modes)
        for turn, first in enumerate(range(1, options.rounds, options.block)):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                for index in range(min(options.block, options.rounds - first)):
                    before = cpu_seconds(modes[name].process.pid)
                    modes[name].go()
                    rounds[name].append(modes[name].line()["wall"])
                    cpu[name].append(cpu_seconds(modes[name].process.pid) - before)
                    counted[name].append(index > 0 or options.block == 1)  # a turn's first round warms up
        result = {}
        for name, mode in modes.items():
            final = mode.line()
            mode.close()
            result[name] = {"rounds": rounds[name], "cpu": cpu[name], "counted": counted[name], "pss_mb": mode.peak,
                            "checksum": final["checksum"]}
        return result
    finally:
        for mode in modes.values():
            if mode.process.poll() is None:
                os.killpg(mode.process.pid, signal.SIGKILL)
                mode.process.wait(timeout=30)


def all_modes(options: argparse.Namespace) -> List[str]:
    """The modes to run: ``--modes``, then ``MODE@base`` for each baseline mode."""
    extra = [f"{mode}@base" for mode in options.baseline_modes if mode != "plain"] if options.baseline else []
    return list(options.modes) + extra


def parent(options: argparse.Namespace) -> None:
    Path(options.logs).mkdir(parents=True, exist_ok=True)
    print(f"bench/modes.py: {options.repeats} repeats x {options.rounds} rounds in lockstep, modes "
          f"{', '.join(all_modes(options))}; load average at start {os.getloadavg()[0]:.1f}")
    results = {}
    for clients, fraction in options.config or CONFIGS:
        results[(clients, fraction)] = [lockstep(options, clients, fraction) for _ in range(options.repeats)]
    print(f"load average at end {os.getloadavg()[0]:.1f}\n")
    print("Steady seconds per round: median of the counted rounds (2..N, less each turn's first with --block) "
          "over all repeats (range of per-repeat medians); "
          "/ plain: median of paired per-round ratios (range of per-repeat medians); peak PSS of all the "
          "mode's processes; CPU: user + system seconds of all its processes per round; SHA-256 of the final weights.\n")
    print("| K | fraction | mode | steady s/round | / plain | CPU s/round | CPU / plain | peak PSS MB | checksum |")
    print("|--:|--:|---|--:|--:|--:|--:|--:|---|")
    for (clients, fraction), repeats in results.items():
        for mode in all_modes(options):
            runs = [steady(run[mode], "rounds") for run in repeats]
            flat = [x for run in runs for x in run]
            medians = [statistics.median(run) for run in runs]
            ratio = cpu_ratio = "-"
            if "plain" in options.modes and mode != "plain":
                ratio = paired(repeats, mode, "rounds")
                cpu_ratio = paired(repeats, mode, "cpu")
            cpu = statistics.median(x for run in repeats for x in steady(run[mode], "cpu"))
            sums = sorted({run[mode]["checksum"] for run in repeats})
            print(f"| {clients} | {fraction} | {mode} | {statistics.median(flat):.3f} ({min(medians):.3f}-"
                  f"{max(medians):.3f}) | {ratio} | {cpu:.3f} | {cpu_ratio} | "
                  f"{max(run[mode]['pss_mb'] for run in repeats):.0f} | {' '.join(sums)} |")


def steady(result: Dict[str, Any], key: str) -> List[float]:
    """The counted rounds' values of ``key``: round 1 and the first round of each turn left out."""
    return [x for x, counted in zip(result[key], result["counted"]) if counted]


def paired(repeats: List[Dict[str, Any]], mode: str, key: str) -> str:
    """Median of the per-round ratios ``mode / plain`` of ``key`` (the counted rounds), with the per-repeat range."""
    pairs = [[a / b if b else float("nan") for a, b in zip(steady(run[mode], key), steady(run["plain"], key))]
             for run in repeats]
    per = [statistics.median(p) for p in pairs]
    return f"{statistics.median(x for p in pairs for x in p):.2f} ({min(per):.2f}-{max(per):.2f})"


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


def modes(text: str) -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"modes must be a comma-separated subset of {', '.join(MODES)}, got {text!r}")
    return names


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--api" in argv:
        run_api()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=1, help="rounds a mode runs per turn; the first one warms up")
    parser.add_argument("--config", type=config, action="append",
                        help="K:FRACTION, e.g. 100:1.0; repeatable (default: 10:1.0, 100:1.0, 100:0.1)")
    parser.add_argument("--modes", type=modes, default=list(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--baseline", default=None, help="another checkout to run --baseline-modes from as MODE@base")
    parser.add_argument("--baseline-modes", type=modes, default=["simulate", "launch2"],
                        help="modes to run from --baseline too (default simulate,launch2)")
    parser.add_argument("--logs", default="/tmp/openfl-bench-modes", help="folder for each mode's output")
    parser.add_argument("--child", choices=("plain",), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.rounds < 3:
        parser.error("--rounds must be >= 3 (round 1 is left out of the steady figures)")
    if options.block < 1 or (options.block > 1 and options.rounds <= options.block):
        parser.error(f"--block must be >= 1, and below --rounds when above 1 (a turn's first round is left out), "
                     f"got --block {options.block} with --rounds {options.rounds}")
    if options.child:
        run_plain(options)
    else:
        parent(options)


if __name__ == "__main__":
    main()
