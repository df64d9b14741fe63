"""Round latency against the number of frontends: synchronous FedAvg of a tiny MLP through the API,
against the same rounds written by hand with raw torch.distributed gloo, in the same processes.

    python bench/rounds.py                      # 8, 16 and 32 frontends, 3 repeats: 2-4 min on 2 CPUs
    python bench/rounds.py --frontends 8 16 --repeats 5 --versions 50

The run starts max(N) + 1 processes once (this file with a hidden ``--child`` argument) and then
runs *blocks*: one block is one phase (API or raw gloo) with N frontends, so ranks 0..N take part
and the others wait on the parent's ``TCPStore`` without using a CPU. Every N is measured
``--repeats`` times, the two phases alternating their order from one repeat to the next, so drift
on the machine hits both. No block starts before every process is up (torch imported), so the
start-up of 33 processes never overlaps a measurement.

What one round is, for N frontends:

- **API**: rank 0 is the backend (``API(frontend=False)``, ``AggregateCount(count=N)``,
  ``StopAtVersion``), ranks 1..N are frontends over ``tcp://127.0.0.1:<port>`` running the
  standard loop: ``download()``, one SGD step, ``upload()``, ``update_version()``. A round is the
  time between two aggregations, taken on the backend by a step whose ``after_aggregate`` records
  ``time.perf_counter()``: it holds N downloads of the new version, N training steps and N
  uploads, each validated and added to the running sum, and the aggregation.
- **raw gloo** (the reference, "no framework"): ranks 0..N build one ``ProcessGroupGloo`` over all
  of them on a ``TCPStore`` at 127.0.0.1, with the device ``openfl_api/transport/gloo.py`` uses on
  loopback, and run the same FedAvg by hand: rank 0 posts a send of the flat parameter vector to
  every frontend and a receive from every frontend, waits for all of them and averages the N
  vectors; each frontend receives the vector, loads it into the same MLP, takes the same SGD step
  and sends its parameters back. A round is the time between two averagings on rank 0. This is
  the floor a framework could reach on this machine: the same bytes, the same training and the
  same averaging, without headers, validation, threads or steps.

The model is ``Linear(8, 16) - ReLU - Linear(16, 1)`` (161 float32 parameters, 644 bytes), the
data 64 random samples per frontend, so a round measures the coordination, not the compute. Each
process uses one torch thread and freezes its imports out of the garbage collector (see
``tests/distributed/scripts/load.py``). Every block runs ``--warmup`` versions (not timed) and
then ``--versions`` timed ones.

Reported per N: the median round of each phase over all timed rounds of all repeats, with the
min-max band of the rounds and of the per-repeat medians; the ratio API / raw (median of the
per-repeat ratios of the medians); the API round against the smallest N's round scaled linearly
(1: the round grows in proportion to the frontends; below 1: better than linear); and the CPU
time per round of all ranks together (``time.process_time`` of every rank over the timed rounds),
which shows what a round costs apart from waiting for a CPU.

Noise: N + 1 processes on a 2-CPU machine oversubscribe it by design, so a round is mostly its
CPU time divided by the CPUs free for it, and anything else running shows up at once. The run
prints the load average at its start, after every block and at its end, and the spread of the
per-repeat medians; read a ratio only against that spread.

Every child runs under a wall-clock limit (``--timeout`` for the whole run, enforced by the child
itself with ``SIGALRM`` and by the parent), is killed when the parent leaves whatever the reason
(``finally`` and, on Linux, ``PR_SET_PDEATHSIG``), and its output goes to a temporary log whose
tail is printed when it fails. Exit status: 0 when the run completed, 1 when a child failed or
the run passed its deadline.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-rounds-0123456789abcdef"
PHASES = ("raw", "api")
LABELS = {"raw": "raw gloo", "api": "API"}
SAMPLES = 64
LR = 0.01


# ----------------------------------------------------------------- the model and one training step


def build_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def local_data(rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + rank)
    inputs = torch.randn(SAMPLES, 8, generator=generator)
    return inputs, inputs.sum(dim=1, keepdim=True)


def train_step(net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One SGD step by hand: a torch.optim optimizer would import torch._dynamo (2 s of CPU each)."""
    net.zero_grad()
    torch.nn.functional.mse_loss(net(inputs), targets).backward()
    with torch.no_grad():
        for param in net.parameters():
            param -= LR * param.grad


# ----------------------------------------------------------------- children


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when the bench exits, however it exits (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent left before the line above ran
        os._exit(1)


def raw_phase(rank: int, frontends: int, port: int, warmup: int, versions: int, wait: timedelta) -> Dict:
    """One rank of the reference: FedAvg by hand over one gloo group of all ranks."""
    from torch.distributed import ProcessGroupGloo, TCPStore
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    world = frontends + 1
    store = TCPStore("127.0.0.1", port, world, rank == 0, timeout=wait)
    options = ProcessGroupGloo._Options()
    options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = wait
    group = ProcessGroupGloo(store, rank, world, options)
    net = build_model(seed=0)
    flat = parameters_to_vector(net.parameters()).detach().clone()
    stamps: List[float] = []
    cpu: List[float] = []  # process CPU time when the timed rounds start and after the last one
    if rank == 0:
        inbox = torch.empty(frontends, flat.numel())
        for version in range(1, versions + 1):
            works = [group.send([flat], peer, 0) for peer in range(1, world)]
            works += [group.recv([inbox[peer - 1]], peer, 0) for peer in range(1, world)]
            for work in works:
                work.wait(wait)
            flat = inbox.mean(dim=0)  # every frontend has SAMPLES samples: FedAvg is the plain mean
            stamps.append(time.perf_counter())
            if version in (warmup, versions):
                cpu.append(time.process_time())
        if not torch.isfinite(flat).all():
            raise SystemExit("raw gloo: the averaged parameters are not finite")
    else:
        inputs, targets = local_data(rank)
        for version in range(versions):  # the version of the model this round starts from
            group.recv([flat], 0, 0).wait(wait)
            if version == warmup:
                cpu.append(time.process_time())
            with torch.no_grad():
                vector_to_parameters(flat, net.parameters())
            train_step(net, inputs, targets)
            flat = parameters_to_vector(net.parameters()).detach().clone()
            group.send([flat], 0, 0).wait(wait)
        cpu.append(time.process_time())
    group.barrier().wait(wait)
    group.shutdown()
    del store
    return {"stamps": stamps, "cpu_s": cpu[1] - cpu[0]}


def api_phase(rank: int, frontends: int, port: int, warmup: int, versions: int, wait: timedelta) -> Dict:
    """One rank of the API phase: the backend times its aggregations, frontends run the loop."""
    import openfl_api as ofl
    from openfl_api import aggregate

    class Clock(ofl.Step):
        """Records when each version was aggregated (wall and CPU time), and counts discarded uploads."""

        roles = frozenset({"backend"})

        def __init__(self) -> None:
            self.stamps: List[float] = []
            self.cpu: List[float] = []
            self.discarded = 0

        def after_upload(self, api, transfer) -> None:
            if not transfer.accepted:
                self.discarded += 1

        def after_aggregate(self, api) -> None:
            self.stamps.append(time.perf_counter())
            self.cpu.append(time.process_time())

    api = ofl.API(frontend=rank > 0, timeout=wait, transfer_timeout=wait, connect_timeout=wait,
                  drain=timedelta(seconds=30))
    clock = Clock()
    api.register_step(clock)
    api.set_aggregate_triggers(ofl.AggregateCount(count=frontends))
    api.register_step(ofl.StopAtVersion(max_version=versions))
    api.build_connection(address=ofl.Address(init_method=f"tcp://127.0.0.1:{port}", world_size=frontends + 1,
                                             rank=rank, group_name="bench-rounds"))
    net = build_model(seed=0)
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
    api.set_state_dict(net.state_dict(keep_vars=True))
    inputs, targets = local_data(rank)
    uploads = 0
    cpu = [0.0, 0.0]  # process CPU time when the timed rounds start and after the last upload
    with api:
        api.run()
        while api.download():
            if api.version == warmup:
                cpu[0] = time.process_time()
            train_step(net, inputs, targets)
            if not api.upload(num_samples=SAMPLES):
                break
            cpu[1] = time.process_time()
            uploads += 1
            api.update_version()
    api.finish()
    if rank == 0:
        if api.version != versions or clock.discarded:
            raise SystemExit(f"API: reached version {api.version} of {versions}, {clock.discarded} uploads discarded")
        return {"stamps": clock.stamps, "cpu_s": clock.cpu[versions - 1] - clock.cpu[warmup - 1]}
    if uploads != versions:
        raise SystemExit(f"API: rank {rank} uploaded {uploads} times, expected {versions}")
    return {"cpu_s": cpu[1] - cpu[0]}


def child(args: argparse.Namespace) -> int:
    """One process of the run: take part in every block whose N reaches this rank, in order."""
    _die_with_parent(args.parent)
    signal.alarm(math.ceil(args.timeout))  # the default action of SIGALRM ends the process
    import torch.nn.utils  # noqa: F401  (imported before the freeze, like everything the phases use)
    from torch.distributed import TCPStore

    import openfl_api
    import openfl_api.aggregate  # noqa: F401
    import openfl_api.api  # noqa: F401

    torch.set_num_threads(1)
    gc.freeze()
    openfl_api.logger.log_level("WARNING")
    wait = timedelta(seconds=args.timeout)
    versions = args.warmup + args.versions
    control = TCPStore("127.0.0.1", args.control, None, False, timeout=wait)
    control.add("ready", 1)
    for index, block in enumerate(args.blocks.split(",")):
        frontends, phase, port = block.split(":")
        control.wait([f"go/{index}"], wait)  # blocks on the parent's store: no CPU while waiting
        if args.rank <= int(frontends):
            run = raw_phase if phase == "raw" else api_phase
            record = run(args.rank, int(frontends), int(port), args.warmup, versions, wait)
            control.set(f"result/{index}/{args.rank}", json.dumps(record))
        control.add(f"done/{index}", 1)
    return 0


# ----------------------------------------------------------------- the parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChildFailed(RuntimeError):
    """A child process failed or the run passed its deadline."""


def _reap(procs: Sequence[subprocess.Popen]) -> None:
    """Kill the children that still run (only these, by their own handles) and wait for them."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no output: {exc})"


class Children:
    """The processes of the run, the parent's control store, and the run's deadline."""

    def __init__(self, world: int, blocks: Sequence[Tuple[int, str, int]], args: argparse.Namespace,
                 workdir: Path) -> None:
        from torch.distributed import TCPStore

        self.deadline = time.monotonic() + args.timeout
        self.timeout = args.timeout
        port = free_port()
        self.control = TCPStore("127.0.0.1", port, None, True, timeout=timedelta(seconds=args.timeout),
                                wait_for_workers=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENFL_", "RANK", "WORLD_SIZE", "MASTER_"))}
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
                   OPENFL_API_TOKEN=TOKEN, OMP_NUM_THREADS="1")
        self.logs = [workdir / f"rank{rank}.log" for rank in range(world)]
        self.procs: List[subprocess.Popen] = []
        spec = ",".join(f"{n}:{phase}:{block_port}" for n, phase, block_port in blocks)
        for rank, log in enumerate(self.logs):
            command = [sys.executable, str(Path(__file__).resolve()), "--child", "--rank", str(rank),
                       "--control", str(port), "--blocks", spec, "--parent", str(os.getpid()),
                       "--warmup", str(args.warmup), "--versions", str(args.versions), "--timeout", str(args.timeout)]
            with open(log, "w") as sink:
                self.procs.append(subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT))

    def wait_count(self, key: str, what: str) -> None:
        """Wait until ``key`` counts every child, failing as soon as one exits or time is up."""
        while self.control.add(key, 0) < len(self.procs):
            # Exit code 0 comes only after the last block, so any exit before then is a failure but
            # that of a child done with the last block while the others finish theirs.
            failed = [rank for rank, proc in enumerate(self.procs) if proc.poll() not in (None, 0)]
            if failed:
                rank = failed[0]
                raise ChildFailed(f"rank {rank} exited with {self.procs[rank].returncode} while {what}\n"
                                  f"--- rank {rank} (last 2500 chars) ---\n{_tail(self.logs[rank])}"
                                  + (f"\n--- rank 0 ---\n{_tail(self.logs[0])}" if rank else ""))
            if time.monotonic() > self.deadline:
                raise ChildFailed(f"the run passed its {self.timeout:.0f} s deadline while {what}\n"
                                  f"--- rank 0 (last 2500 chars) ---\n{_tail(self.logs[0])}")
            time.sleep(0.05)  # polling the count, under the deadline above

    def run_block(self, index: int, frontends: int, what: str) -> List[Dict]:
        """Run block ``index``; return the records of ranks 0..frontends."""
        self.control.set(f"go/{index}", "1")
        self.wait_count(f"done/{index}", what)
        return [json.loads(self.control.get(f"result/{index}/{rank}")) for rank in range(frontends + 1)]

    def close(self, linger: float = 0.0) -> None:
        """Give the children ``linger`` seconds to exit on their own, then kill those left."""
        deadline = time.monotonic() + linger
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        _reap(self.procs)


def _rounds(stamps: Sequence[float], warmup: int) -> List[float]:
    """Seconds between consecutive aggregations, leaving out the first ``warmup`` versions."""
    return [later - earlier for earlier, later in zip(stamps[warmup - 1:], stamps[warmup:])]


def _ms(values: Sequence[float]) -> str:
    return f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}"


def _spread(values: Sequence[float]) -> float:
    """Band width in % of the median."""
    return 100.0 * (max(values) - min(values)) / statistics.median(values)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Round latency of synchronous FedAvg (tiny MLP) through openfl_api against the number of "
        "frontends, with the same rounds over raw torch.distributed gloo as the reference, in the same processes.",
    )
    parser.add_argument("--frontends", type=int, nargs="+", default=[8, 16, 32],
                        help="numbers of frontends to measure (default 8 16 32)")
    parser.add_argument("--versions", type=int, default=30, help="timed versions per phase and repeat (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="versions before the timed ones (default 3)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats of every (N, phase) block, alternating the order of the phases (default 3)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds the whole run may take before every process is killed (default 900)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--rank", "--control", "--parent"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and (min(args.frontends) < 1 or args.versions < 1 or args.warmup < 1 or args.repeats < 1
                           or args.timeout <= 0):
        parser.error("--frontends, --versions, --warmup and --repeats must be >= 1 and --timeout > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)

    frontends = sorted(set(args.frontends))
    world = frontends[-1] + 1
    blocks: List[Tuple[int, str, int]] = []
    for repeat in range(args.repeats):
        for n in frontends:
            for phase in PHASES if repeat % 2 == 0 else PHASES[::-1]:
                blocks.append((n, phase, free_port()))
    print(f"model: Linear(8, 16) - ReLU - Linear(16, 1), 161 float32 parameters (644 bytes); {SAMPLES} samples "
          f"and one SGD step per frontend and round")
    print(f"frontends {frontends} ({world} processes, started once); {args.warmup} warm-up + {args.versions} timed "
          f"versions per block, {args.repeats} repeats; torch {torch.__version__}, 1 torch thread per process, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    rounds: Dict[int, Dict[str, List[float]]] = {n: {p: [] for p in PHASES} for n in frontends}
    medians: Dict[Tuple[int, int, str], float] = {}
    cpu: Dict[Tuple[int, int, str], float] = {}  # CPU seconds of all ranks per timed round
    backend_cpu: Dict[Tuple[int, int, str], float] = {}  # the same, rank 0 alone
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="openfl-rounds-") as tmp:
        children = None
        linger = 0.0
        try:
            children = Children(world, blocks, args, Path(tmp))
            children.wait_count("ready", "starting")
            print(f"{world} processes up in {time.monotonic() - started:.0f} s, load average "
                  f"{os.getloadavg()[0]:.1f}\n", flush=True)
            for index, (n, phase, _) in enumerate(blocks):
                repeat = index // (2 * len(frontends))
                records = children.run_block(index, n, f"running N={n} {phase}")
                timed = _rounds(records[0]["stamps"], args.warmup)
                rounds[n][phase] += timed
                medians[repeat, n, phase] = statistics.median(timed)
                cpu[repeat, n, phase] = sum(r["cpu_s"] for r in records) / args.versions
                backend_cpu[repeat, n, phase] = records[0]["cpu_s"] / args.versions
                print(f"repeat {repeat + 1} N={n:>2} {LABELS[phase]:>8}: median round {medians[repeat, n, phase] * 1e3:6.1f} "
                      f"ms (rounds {_ms(timed)} ms), CPU {cpu[repeat, n, phase] * 1e3:6.1f} ms per round (rank 0: "
                      f"{backend_cpu[repeat, n, phase] * 1e3:.1f}); load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
            linger = 30.0  # every block is done: the children are exiting
        except ChildFailed as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            if children is not None:
                children.close(linger)

    def per_repeat(table: Dict[Tuple[int, int, str], float], n: int, phase: str) -> List[float]:
        return [table[r, n, phase] for r in range(args.repeats)]

    print()
    print("round latency (ms): median of all timed rounds (min-max of the rounds; min-max of the repeat medians)")
    print(f"{'N':>3} | {'API':^34} | {'raw gloo':^34} | API / raw | API / linear")
    base = statistics.median(rounds[frontends[0]]["api"])
    for n in frontends:
        cells = [f"{statistics.median(rounds[n][phase]) * 1e3:6.1f} ({_ms(rounds[n][phase])}; "
                 f"{_ms(per_repeat(medians, n, phase))})" for phase in ("api", "raw")]
        ratio = statistics.median([a / r for a, r in zip(per_repeat(medians, n, "api"), per_repeat(medians, n, "raw"))])
        linear = statistics.median(rounds[n]["api"]) / (base * n / frontends[0])
        print(f"{n:>3} | {cells[0]:^34} | {cells[1]:^34} | {ratio:9.2f} | {linear:12.2f}")
    print(f"API / raw: median of the per-repeat ratios of the medians. API / linear: the API round against the "
          f"N={frontends[0]} round scaled by N/{frontends[0]} (1: grows in proportion; below 1: better).")
    print()
    print("CPU time per round (ms): every rank's process CPU time over the timed rounds / rounds, median of the repeats")
    print(f"{'N':>3} | {'API: all ranks (per frontend; rank 0)':^40} | {'raw gloo: all ranks (per frontend; rank 0)':^44} "
          f"| API / raw")
    for n in frontends:
        cells = []
        for phase in ("api", "raw"):
            total = statistics.median(per_repeat(cpu, n, phase))
            cells.append(f"{total * 1e3:6.1f} ({total / n * 1e3:.1f}; {statistics.median(per_repeat(backend_cpu, n, phase)) * 1e3:.1f})")
        ratio = statistics.median(per_repeat(cpu, n, "api")) / statistics.median(per_repeat(cpu, n, "raw"))
        print(f"{n:>3} | {cells[0]:^40} | {cells[1]:^44} | {ratio:9.2f}")
    print("With N + 1 processes on this machine's CPUs a round is mostly its CPU time divided by the CPUs free for "
          "it: the CPU time is the steadier figure on a shared machine.")
    spreads = ", ".join(f"N={n} API {_spread(per_repeat(medians, n, 'api')):.0f}% raw "
                        f"{_spread(per_repeat(medians, n, 'raw')):.0f}%" for n in frontends)
    print(f"noise: repeat medians spread (% of their median): {spreads}; load average {os.getloadavg()[0]:.1f} at "
          f"the end ({os.cpu_count()} CPUs). N + 1 processes oversubscribe the CPUs by design; other work on the "
          "machine adds to that, so compare figures only within one run.")
    print(f"wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
