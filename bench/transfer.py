"""Transfer benchmark: download + upload of a ResNet-18-sized state_dict through the API, against
raw gloo send/recv of the same bytes in the same run.

    python bench/transfer.py                  # 3 repeats x 15 timed rounds per phase, 30-70 s
    python bench/transfer.py --rounds 30 --repeats 5
    python bench/transfer.py --threads 0      # torch's default threads per process instead of 1

What one round is:

- **raw gloo** (the reference): a two-rank ``ProcessGroupGloo`` on a ``TCPStore`` at 127.0.0.1, with
  the device ``openfl_api/transport/gloo.py`` uses on loopback. Rank 0 sends the state_dict's bytes
  as one flat uint8 tensor to rank 1, rank 1 sends them back into a preallocated buffer. Timed on
  rank 0, from the send to the end of the receive.
- **API**: the backend (rank 0, ``API(frontend=False)``) and one frontend (rank 1) over
  ``tcp://127.0.0.1:<port>``. The frontend's round is ``api.upload(num_samples=1)`` then
  ``api.download()``, timed with ``time.perf_counter`` around both: the upload is pipelined
  (``upload()`` returns while it travels) and the download awaits its answer first, so the round
  holds the whole of both. The backend
  aggregates only after ``AggregateCount(count=10**9)`` uploads, i.e. never, and the frontend
  never calls ``update_version()``, so every round is served version 0: the backend encodes the
  model once (in the warm-up) and serves that cached buffer. The API runs in asynchronous mode
  (``Asynchronous(staleness=Constant())``), where every upload of staleness 0 is accepted: each
  one is validated and added into the ``AverageAggregator``'s running sum, as any accepted upload
  is. (In synchronous mode a client's second upload for one version is discarded as a duplicate
  after validation, which would skip the accumulation.)

- **round**: a whole synchronous round, as a training loop runs it: the backend in synchronous
  mode with ``AggregateCount(count=1)``, one frontend. Its timed round is ``api.upload(num_samples=1)``,
  ``api.update_version()`` and the ``api.download()`` of the next version: the upload's transfer
  and validation, the exact accumulation and the aggregation into a new version, the encoding of
  that version and its transfer back, and its load into the frontend's model. The frontend trains
  nothing, so every version holds the values it started from, up to the exact sum's fixed-point
  grid (``openfl_api/aggregate/exact.py``: a value far below its tensor's largest may move by
  about 1e-13).

The model is a ``torch.nn.Module`` with ResNet-18's state_dict written out by hand (no
torchvision): 62 parameters (11,689,512 float32) and 60 batch-norm buffers (running mean and
variance, float32, and ``num_batches_tracked``, int64), 46.8 MB (44.6 MiB). Both phases move
exactly the state_dict's bytes; the API adds its frames, JSON headers and 64-byte alignment.

- **floor** (what any implementation of the contract must at least do): the raw gloo round plus
  the passes over the bytes that DESIGN.md requires and nothing else. Rank 1 receives the model
  into a buffer, checks it for NaN/Inf (one ``sum`` per dtype run, as the API does) and copies it
  into its model's tensors (``download()`` loads in place, and only after the check; split over two
  threads, as the API does it); it sends its model back from the model's own memory; rank 0
  receives it into a buffer, checks it and adds it to a running sum (``add_`` with a weight). No
  headers, no steps, no other threads. ``floor / raw`` says
  how close to raw gloo a contract-abiding implementation can get on this machine; ``API /
  floor`` what the framework costs on top of that.

Each repeat starts every phase in two fresh processes (``subprocess``, this file with a hidden
``--child`` argument), eight at once, and runs them **in lockstep**: each phase warms up for 2
rounds, then its timing rank (rank 0 for raw and floor, the frontend for the API and the round)
waits for the parent's go before each of its ``--rounds`` rounds; the parent lets one phase run
one round while the others wait (blocked on a pipe or on their peer, using no CPU), rotating the
order every round. The speed of this machine drifts by tens of percent within minutes; rounds a
tenth of a second apart see the same drift, so the ratio of paired rounds is steady where the
ratio of two separate runs is not. Reported per phase: the median round (ms) over all timed rounds
and throughput (GB/s = 1e9 B/s, counting 2 x the state_dict bytes per round), with the band of the
per-repeat medians; then the ratios API / raw and round / raw of throughput, each the median of
the paired per-round ratios, against the targets of 0.9 and 0.7.

Noise: on a 2-CPU machine the two processes already fill both CPUs during a transfer (each
side's gloo thread copies to or from the kernel), so anything else running shows up at once. The
run prints the load average at its start and end and the spread of the per-repeat medians; read
a ratio only against that spread. Each child uses one torch thread by default, as every rank
started by ``python -m openfl_api.launch`` (and by ``torchrun``) does with ``OMP_NUM_THREADS=1``:
with torch's default of one OpenMP thread per CPU, the spinning OpenMP threads take the CPUs from
gloo's I/O threads and the API's tensor work (copies, sums) is inflated far more than raw gloo,
whose hot path runs no torch operator; ``--threads 0`` shows how much of a gap that is.

Every child runs under a wall-clock limit (``--timeout``) and is killed when the parent leaves,
whatever the reason. When a child fails, the tail of each child's output is printed. Exit status: 0 when the run completed
(whatever the ratio), 1 when a child failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import select
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
WARMUP = 2
TARGET = 0.9  # API download + upload / raw gloo, throughput
ROUND_TARGET = 0.7  # a whole synchronous round / raw gloo, throughput
PHASES = ("raw", "floor", "api", "round")
TIMER = {"raw": 0, "floor": 0, "api": 1, "round": 1}  # the rank that times a phase's rounds
TOKEN = "bench-transfer-0123456789abcdef"


# ----------------------------------------------------------------- the model


def resnet18_entries() -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    """Return ResNet-18's state_dict as ``(key, shape, dtype)``, in torchvision's order."""
    entries: List[Tuple[str, Tuple[int, ...], torch.dtype]] = []

    def bn(prefix: str, channels: int) -> None:
        entries.extend(
            [
                (f"{prefix}.weight", (channels,), torch.float32),
                (f"{prefix}.bias", (channels,), torch.float32),
                (f"{prefix}.running_mean", (channels,), torch.float32),
                (f"{prefix}.running_var", (channels,), torch.float32),
                (f"{prefix}.num_batches_tracked", (), torch.int64),
            ]
        )

    entries.append(("conv1.weight", (64, 3, 7, 7), torch.float32))
    bn("bn1", 64)
    in_channels = 64
    for layer, channels in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            first = in_channels if block == 0 else channels
            entries.append((f"{prefix}.conv1.weight", (channels, first, 3, 3), torch.float32))
            bn(f"{prefix}.bn1", channels)
            entries.append((f"{prefix}.conv2.weight", (channels, channels, 3, 3), torch.float32))
            bn(f"{prefix}.bn2", channels)
            if block == 0 and first != channels:
                entries.append((f"{prefix}.downsample.0.weight", (channels, first, 1, 1), torch.float32))
                bn(f"{prefix}.downsample.1", channels)
        in_channels = channels
    entries.append(("fc.weight", (1000, 512), torch.float32))
    entries.append(("fc.bias", (1000,), torch.float32))
    return entries


_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def build_model(seed: int) -> torch.nn.Module:
    """A module whose ``state_dict()`` has ResNet-18's keys, shapes and dtypes, filled from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    root = torch.nn.Module()
    for key, shape, dtype in resnet18_entries():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if dtype.is_floating_point:
            value = torch.randn(shape, generator=generator, dtype=dtype) * 0.05
        else:
            value = torch.zeros(shape, dtype=dtype)
        if leaf in _BUFFER_SUFFIXES:
            module.register_buffer(leaf, value)
        else:
            module.register_parameter(leaf, torch.nn.Parameter(value))
    return root


def state_nbytes(model: torch.nn.Module) -> int:
    """The bytes of every tensor of ``model.state_dict()``, without padding."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def flat_bytes(model: torch.nn.Module) -> torch.Tensor:
    """The state_dict's bytes concatenated into one uint8 tensor."""
    return torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in model.state_dict().values()])


# ----------------------------------------------------------------- children


def _publish(path: str, record: Dict) -> None:
    temporary = Path(path).with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)


class Gate:
    """The timing rank's side of the lockstep: before each timed round it waits for the parent's
    ``go`` on stdin, after it reports the round as one JSON line on stdout; at the end it waits for
    ``end``. The other rank of a phase just follows its peer."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def before(self, index: int) -> None:
        if not self.active or index < WARMUP:
            return
        if index == WARMUP:
            print("ready", flush=True)
        self._expect("go")

    def after(self, index: int, record: Dict) -> None:
        if self.active and index >= WARMUP:
            print(json.dumps(record), flush=True)

    def finish(self) -> None:
        if self.active:
            self._expect("end")

    @staticmethod
    def _expect(word: str) -> None:
        line = sys.stdin.readline().strip()
        if line != word:
            raise SystemExit(f"expected {word!r} from the parent, got {line!r}")


def _gloo_pair(rank: int, port: int, wait: timedelta):
    """A two-rank ProcessGroupGloo on a TCPStore at 127.0.0.1, with the device the API's pipes use."""
    from torch.distributed import ProcessGroupGloo, TCPStore

    store = TCPStore("127.0.0.1", port, 2, rank == 0, timeout=wait)
    options = ProcessGroupGloo._Options()
    options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = wait
    return ProcessGroupGloo(store, rank, 2, options)


def _timed_ping(group, source: torch.Tensor, inbox: torch.Tensor, wait: timedelta, gate: Gate, index: int,
                then=None) -> None:
    """Rank 0's round of the raw and floor phases: send ``source`` to rank 1, receive its answer
    into ``inbox``, run ``then()``; timed and reported through ``gate``."""
    gate.before(index)
    start = time.perf_counter()
    group.send([source], 1, 0).wait(wait)
    group.recv([inbox], 1, 0).wait(wait)
    if then is not None:
        then()
    gate.after(index, {"round_s": time.perf_counter() - start})


def child_raw(rank: int, port: int, rounds: int, out: str, timeout: float) -> None:
    """One rank of the reference: ping-pong the flat state_dict bytes over raw gloo."""
    wait = timedelta(seconds=timeout)
    group = _gloo_pair(rank, port, wait)
    source = flat_bytes(build_model(seed=0))
    inbox = torch.empty_like(source)
    gate = Gate(active=rank == 0)
    for index in range(WARMUP + rounds):
        if rank == 0:
            _timed_ping(group, source, inbox, wait, gate, index)
        else:
            group.recv([inbox], 0, 0).wait(wait)
            group.send([inbox], 0, 0).wait(wait)
    gate.finish()
    if rank == 0:
        if not torch.equal(inbox, source):
            raise SystemExit("raw gloo: the bytes that came back differ from those sent")
        _publish(out, {})
    else:
        _publish(out, {})
    group.barrier().wait(wait)
    group.shutdown()


def child_floor(rank: int, port: int, rounds: int, out: str, timeout: float) -> None:
    """One rank of the floor: the raw round plus the check, the in-place load and the accumulation.

    Everything is as cheap as it can be: one flat message each way, one ``sum`` over the buffer
    for the check (every entry of this model is float32 or a small int64, so its bytes read as
    float32 are finite exactly when the model's floats are), the copy split over two threads as
    the API splits it (``openfl_api.state.copy_all_``), one foreach add.
    """
    from openfl_api.state import copy_all_

    wait = timedelta(seconds=timeout)
    group = _gloo_pair(rank, port, wait)
    model = build_model(seed=0 if rank == 0 else 1)
    tensors = [t.detach() for t in model.state_dict().values()]
    source = flat_bytes(model)  # rank 0's encoding of its model, made once as the API caches it
    inbox = torch.zeros_like(source)
    views, offset = [], 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        views.append(inbox[offset : offset + size].view(tensor.dtype).view(tensor.shape))
        offset += size
    sums = [torch.zeros(t.shape, dtype=t.dtype if t.is_floating_point() else torch.float64) for t in tensors]

    def check() -> None:
        if not torch.isfinite(inbox.view(torch.float32).sum()):
            raise SystemExit("floor: a non-finite value arrived")

    def check_and_add() -> None:
        check()
        torch._foreach_add_(sums, views, alpha=0.5)

    gate = Gate(active=rank == 0)
    for index in range(WARMUP + rounds):
        if rank == 0:
            _timed_ping(group, source, inbox, wait, gate, index, then=check_and_add)
        else:
            group.recv([inbox], 0, 0).wait(wait)
            check()
            copy_all_(tensors, views)
            # The model's bytes, sent from a buffer that equals it: as cheap as a send can be.
            group.send([inbox], 0, 0).wait(wait)
    gate.finish()
    if rank == 0:
        _publish(out, {})
    else:
        expected = build_model(seed=0).state_dict()
        if not all(torch.equal(t, expected[k]) for k, t in model.state_dict().items()):
            raise SystemExit("floor: rank 1's model did not become rank 0's")
        _publish(out, {})
    group.barrier().wait(wait)
    group.shutdown()


def _stop_when_frontend_leaves() -> object:
    """Build a backend step that stops the serve loop once the frontend leaves."""
    import openfl_api as ofl  # here, not at the top: the parent process never imports openfl_api

    class StopWhenFrontendLeaves(ofl.Step):
        roles = frozenset({"backend"})

        def on_leave(self, api, peer):
            api.stop("bench done: the frontend left")

    return StopWhenFrontendLeaves()


def _connected_api(rank: int, port: int, timeout: float, asynchronous: bool, count: int):
    """An API of one rank of a two-rank federation on ``port`` with ResNet-18's state, ready to
    run; returns it and its model. The frontend starts from other values, so a download that
    loaded nothing shows in the frontend's final check."""
    import openfl_api as ofl
    from openfl_api import aggregate

    ofl.logger.log_level("WARNING")
    wait = timedelta(seconds=timeout)
    mode = ofl.Asynchronous(alpha=1.0, staleness=aggregate.Constant()) if asynchronous else None
    api = ofl.API(frontend=rank > 0, timeout=wait, transfer_timeout=wait, connect_timeout=wait, asynchronous=mode)
    api.set_aggregate_triggers(ofl.AggregateCount(count=count))
    api.register_step(_stop_when_frontend_leaves())
    api.build_connection(address=ofl.Address(init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank))
    net = build_model(seed=0 if rank == 0 else 1)
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
    api.set_state_dict(net.state_dict(keep_vars=True))
    return api, net


def child_api(rank: int, port: int, rounds: int, out: str, timeout: float) -> None:
    """One rank of the API phase: the backend serves, the frontend times upload + download.

    An upload is pipelined (``upload()`` returns while it travels); the download that follows
    awaits its answer first, so the timed round holds the whole upload and the whole download."""
    api, net = _connected_api(rank, port, timeout, asynchronous=True, count=10**9)
    gate = Gate(active=rank > 0)
    ran = 0
    with api:
        api.run()
        if rank == 0 or api.download():
            for index in range(WARMUP + rounds):
                gate.before(index)
                start = time.perf_counter()
                if not api.upload(num_samples=1):
                    break
                middle = time.perf_counter()
                if not api.download():
                    break
                end = time.perf_counter()
                gate.after(index, {"round_s": end - start, "upload_s": middle - start})
                ran += 1
        gate.finish()
    if rank > 0:
        expected = build_model(seed=0).state_dict()
        same = all(torch.equal(t, expected[k]) for k, t in net.state_dict().items())
        if ran != WARMUP + rounds or not same:
            api.finish()
            raise SystemExit(f"API: {ran} of {WARMUP + rounds} rounds ran, model loaded: {same}")
        _publish(out, {"version": api.version})
    else:
        _publish(out, {"version": api.version, "stop_reason": api.stop_reason})
    api.finish()


def child_round(rank: int, port: int, rounds: int, out: str, timeout: float) -> None:
    """One rank of the whole-round phase: synchronous, one upload per version; the frontend times
    upload + update_version + the next version's download."""
    api, net = _connected_api(rank, port, timeout, asynchronous=False, count=1)
    gate = Gate(active=rank > 0)
    ran = 0
    with api:
        api.run()
        if rank > 0 and api.download():
            for index in range(WARMUP + rounds):
                gate.before(index)
                start = time.perf_counter()
                if not api.upload(num_samples=1):
                    break
                api.update_version()
                middle = time.perf_counter()
                if not api.download():
                    break
                gate.after(index, {"round_s": time.perf_counter() - start, "upload_s": middle - start})
                ran += 1
            gate.finish()
    if rank > 0:
        expected = build_model(seed=0).state_dict()
        same = all(float((t - expected[k]).abs().max()) <= 1e-9 for k, t in net.state_dict().items())
        if ran != WARMUP + rounds or not same or api.version != WARMUP + rounds:
            api.finish()
            raise SystemExit(f"round: {ran} of {WARMUP + rounds} rounds ran, version {api.version}, model kept: {same}")
        _publish(out, {"version": api.version})
    else:
        _publish(out, {"version": api.version, "stop_reason": api.stop_reason})
    api.finish()


# ----------------------------------------------------------------- the parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChildFailed(RuntimeError):
    """A child process failed, timed out or wrote no result."""


def run_lockstep(rounds: int, timeout: float, threads: int, workdir: Path) -> Dict[str, Dict]:
    """Run the phases at once, two fresh processes each, in lockstep.

    The timing rank of each phase (rank 0 for raw and floor, the frontend otherwise) waits for
    the parent's go before each timed round; the parent lets one phase run one round while the
    others wait (blocked on a pipe or on their peer, using no CPU), rotating the order every round.
    Returns per phase the list of round records and the final records of rank 0 and rank 1.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("OPENFL_INIT_METHOD", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OPENFL_API_TOKEN"] = TOKEN
    procs: Dict[Tuple[str, int], subprocess.Popen] = {}
    logs: Dict[Tuple[str, int], object] = {}
    outs: Dict[Tuple[str, int], Path] = {}
    deadline = time.monotonic() + timeout

    def line(phase: str) -> str:
        proc = procs[(phase, TIMER[phase])]
        ready, _, _ = select.select([proc.stdout], [], [], max(0.1, deadline - time.monotonic()))
        text = proc.stdout.readline() if ready else ""
        if not text:
            raise ChildFailed(f"{phase}: the timing rank wrote nothing more (it failed, or {timeout:.0f} s passed)")
        return text.strip()

    def say(phase: str, word: str) -> None:
        proc = procs[(phase, TIMER[phase])]
        proc.stdin.write(word + "\n")
        proc.stdin.flush()

    try:
        for phase in PHASES:
            port = free_port()
            for rank in (0, 1):
                key = (phase, rank)
                logs[key] = open(workdir / f"{phase}_{port}_rank{rank}.log", "w+")
                outs[key] = workdir / f"{phase}_{port}_rank{rank}.json"
                command = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--rank", str(rank),
                           "--port", str(port), "--rounds", str(rounds), "--out", str(outs[key]),
                           "--timeout", str(timeout), "--threads", str(threads)]
                timer = rank == TIMER[phase]
                procs[key] = subprocess.Popen(
                    command, env=env, text=True, stdin=subprocess.PIPE if timer else subprocess.DEVNULL,
                    stdout=subprocess.PIPE if timer else logs[key], stderr=logs[key])
        for phase in PHASES:
            if line(phase) != "ready":
                raise ChildFailed(f"{phase}: the timing rank did not say ready")
        records: Dict[str, List[Dict]] = {phase: [] for phase in PHASES}
        for number in range(rounds):
            turn = number % len(PHASES)
            for phase in PHASES[turn:] + PHASES[:turn]:
                say(phase, "go")
                records[phase].append(json.loads(line(phase)))
        for phase in PHASES:
            say(phase, "end")
        for key, proc in procs.items():
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise ChildFailed(f"{key[0]} rank {key[1]} did not finish within {timeout:.0f} s") from None
            if code != 0 or not outs[key].exists():
                raise ChildFailed(f"{key[0]} rank {key[1]} exited with {code}")
        return {phase: {"rounds": records[phase], "ranks": [json.loads(outs[(phase, r)].read_text()) for r in (0, 1)]}
                for phase in PHASES}
    except ChildFailed as exc:
        _reap(list(procs.values()))
        details = []
        for (phase, rank), log in logs.items():
            log.seek(0)
            details.append(f"--- {phase} rank {rank} output (last 3000 chars) ---\n{log.read()[-3000:]}")
        raise ChildFailed(f"{exc}\n" + "\n".join(details)) from None
    finally:
        _reap(list(procs.values()))
        for log in logs.values():
            log.close()


def _reap(procs: Sequence[subprocess.Popen]) -> None:
    """Kill the children that still run (only these, by their own handles) and wait for them."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _band(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}-{high:.2f}"


def _spread(values: Sequence[float]) -> float:
    """Band width in % of the median."""
    return 100.0 * (max(values) - min(values)) / statistics.median(values)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download + upload of a ResNet-18-sized state_dict (46.8 MB) through openfl_api "
        "between two processes, against raw gloo send/recv of the same bytes; prints both and the ratio "
        f"(target >= {TARGET}).",
    )
    parser.add_argument("--rounds", type=int, default=15,
                        help="timed rounds per phase and repeat, after 2 warm-up rounds (default 15)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh-process repeats of each phase, in alternating order (default 3)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one repeat (all phases) may take before its processes are killed "
                        "(default 120)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads in every child process, 1 as under the launcher; "
                        "0 keeps torch's default (default 1)")
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.timeout <= 0 or args.threads < 0:
        parser.error("--rounds and --repeats must be >= 1, --timeout > 0 and --threads >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        child = {"raw": child_raw, "floor": child_floor, "api": child_api, "round": child_round}[args.child]
        child(args.rank, args.port, args.rounds, args.out, args.timeout)
        return 0

    model = build_model(seed=0)
    state = model.state_dict()
    nbytes = state_nbytes(model)
    params = sum(p.numel() for p in model.parameters())
    moved = 2 * nbytes
    threads = args.threads or torch.get_num_threads()
    print(f"state_dict: {len(state)} tensors ({len(list(model.parameters()))} parameters, {params:,} float32 "
          f"parameter values), {nbytes:,} bytes = {nbytes / 1e6:.1f} MB = {nbytes / 2**20:.1f} MiB")
    print(f"round: one download + one upload = {moved:,} bytes; {WARMUP} warm-up + {args.rounds} timed rounds, "
          f"{args.repeats} repeats per phase; torch {torch.__version__}, {threads} torch threads per process, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print("API phase: asynchronous mode and AggregateCount(count=10**9), so no aggregation runs and the version "
          "stays 0: the backend serves its cached encoding; each upload is validated and added to the running sum")
    print()

    medians: Dict[str, List[float]] = {phase: [] for phase in PHASES}  # per repeat
    every: Dict[str, List[float]] = {phase: [] for phase in PHASES}  # every timed round
    returns: List[float] = []  # when upload() returned, in the API phase
    paired: Dict[str, List[float]] = {"api": [], "floor": [], "round": []}  # raw / phase, round by round
    repeat_ratios: Dict[str, List[float]] = {"api": [], "floor": [], "round": []}  # each repeat's median pair
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="openfl-bench-") as tmp:
        try:
            for repeat in range(args.repeats):
                result = run_lockstep(args.rounds, args.timeout, args.threads, Path(tmp))
                rounds = {phase: [r["round_s"] for r in result[phase]["rounds"]] for phase in PHASES}
                for phase in PHASES:
                    medians[phase].append(statistics.median(rounds[phase]))
                    every[phase].extend(rounds[phase])
                    print(f"repeat {repeat + 1} {phase:>5}: median round {medians[phase][-1] * 1e3:6.1f} ms, "
                          f"{moved / medians[phase][-1] / 1e9:4.2f} GB/s (rounds {min(rounds[phase]) * 1e3:.1f}-"
                          f"{max(rounds[phase]) * 1e3:.1f} ms)", flush=True)
                returns.extend(r["upload_s"] for r in result["api"]["rounds"])
                for phase in ("api", "round"):
                    backend, frontend = result[phase]["ranks"]
                    print(f"         {phase:>5}: versions: frontend {frontend['version']}, backend {backend['version']}; "
                          f"backend stopped: {backend['stop_reason']!r}")
                for phase in ("api", "floor", "round"):
                    pairs = [raw / other for raw, other in zip(rounds["raw"], rounds[phase])]
                    paired[phase].extend(pairs)
                    repeat_ratios[phase].append(statistics.median(pairs))
        except ChildFailed as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1

    print()
    labels = {"raw": "raw gloo send/recv", "floor": "contract floor", "api": "API upload+download",
              "round": "API synchronous round"}
    for phase in PHASES:
        ms = [m * 1e3 for m in medians[phase]]
        rates = [moved / m / 1e9 for m in medians[phase]]
        print(f"{labels[phase]:>20}: median round {statistics.median(every[phase]) * 1e3:6.1f} ms (per-repeat medians "
              f"{_band(ms)}), {moved / statistics.median(every[phase]) / 1e9:.2f} GB/s (band {_band(rates)}); "
              f"best round {min(every[phase]) * 1e3:.1f} ms")
    print(f"{'':>20}  upload() returns after {statistics.median(returns) * 1e3:.1f} ms; the upload's answer and the "
          f"download take the other {(statistics.median(every['api']) - statistics.median(returns)) * 1e3:.1f} ms "
          "(medians)")
    ratio = statistics.median(paired["api"])
    print(f"{'ratio API / raw':>20}: {ratio:.2f} (throughput, median of {len(paired['api'])} paired rounds; "
          f"per-repeat medians {_band(repeat_ratios['api'])}); ratio of best rounds "
          f"{min(every['raw']) / min(every['api']):.2f}")
    print(f"{'ratio floor / raw':>20}: {statistics.median(paired['floor']):.2f} (per-repeat medians "
          f"{_band(repeat_ratios['floor'])}): the most a contract-abiding implementation can reach here")
    print(f"{'ratio API / floor':>20}: {statistics.median(every['floor']) / statistics.median(every['api']):.2f} "
          "(what the framework costs beyond the work the contract requires)")
    round_ratio = statistics.median(paired["round"])
    print(f"{'ratio round / raw':>20}: {round_ratio:.2f} (per-repeat medians {_band(repeat_ratios['round'])}): "
          "upload, aggregation into a new version and its download, against the same bytes over raw gloo")
    print(f"{'target':>20}: API / raw >= {TARGET}: {'PASS' if ratio >= TARGET else 'BELOW'}; "
          f"round / raw >= {ROUND_TARGET}: {'PASS' if round_ratio >= ROUND_TARGET else 'BELOW'}")
    quartiles = statistics.quantiles(paired["api"], n=4)
    print(f"noise: per-repeat medians spread {_spread(medians['raw']):.0f}% (raw), {_spread(medians['floor']):.0f}% "
          f"(floor), {_spread(medians['api']):.0f}% (API) and {_spread(medians['round']):.0f}% (round) of their median; the paired API / raw ratios have "
          f"quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}; load average {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} CPUs). A load average near or above the CPU count means other processes shared the "
          "CPUs and the figures are not a baseline.")
    print(f"wall time {time.monotonic() - started:.0f} s")
    return 0

if __name__ == "__main__":
    sys.exit(main())
