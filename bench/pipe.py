"""The pipe layer alone: a request and its answer through two ``GlooPipe`` ends, against raw gloo
send/recv of the same bytes, in the same run.

    python bench/pipe.py                       # 644-byte updates (the payload travels inline), 5 repeats
    python bench/pipe.py --payload 800000      # an 0.8 MB update: the payload is a piece of its own

One round trip is what a frontend's upload costs the pipes, without the API around them:

- **pipe**: rank 1 sends an ``UPLOAD`` (a JSON header of an update's size and a payload of
  ``--payload`` bytes) with ``GlooPipe.send`` and receives the ``ACK`` with ``GlooPipe.recv``;
  rank 0 receives the upload into a reused buffer and sends the ACK. Framing, frame checks and
  the piece table are all in; validation, steps and threads of the API are not.
- **raw** (the reference): the same two ranks on a ``ProcessGroupGloo`` with the device the pipes
  use on loopback; rank 1 sends one message of the upload's bytes (header + payload) and waits for
  a message of the ACK's bytes, rank 0 receives into buffers of those sizes and answers. This is
  the floor for one request and one answer over gloo.

Each phase runs in two fresh processes (this file with a hidden ``--child`` argument, one torch
thread each, importing ``openfl_api`` from the checkout this file is in), ``--round-trips`` timed round trips after 300 untimed ones; the phases alternate
from one repeat to the next. Printed per phase: the median over the repeats of the CPU time per
round trip of each rank (``time.process_time``) and of the wall time per round trip on rank 1,
with the range of the repeats; then the ratios pipe / raw. CPU time is the steadier figure: the
machine's speed drifts by tens of percent within minutes, and the load average is printed at the
start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
PHASES = ("pipe", "raw")
WARMUP = 300
HEADER = (b'{"kind":"update","version":3,"sender":"rank1","meta":{"num_samples":64,"metrics":{}},'
          b'"tensors":[["0.weight","float32",[16,8],0],["0.bias","float32",[16],512]]}')
ACK = b'{"accepted":true,"reason":"","version":3}'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child(phase: str, rank: int, port: int, payload_bytes: int, round_trips: int) -> Dict[str, float]:
    """One rank of one phase; returns its CPU seconds and wall seconds over the timed round trips."""
    import torch
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

    sys.path.insert(0, str(REPO))
    from openfl_api.transport.base import Kind, Limits, Message
    from openfl_api.transport.gloo import open_gloo_pipe

    torch.set_num_threads(1)
    wait = timedelta(seconds=60)
    store = TCPStore("127.0.0.1", port, 2, rank == 0, wait)
    payload = torch.arange(payload_bytes, dtype=torch.int64).to(torch.uint8)
    if phase == "pipe":
        pipe = open_gloo_pipe(store, "bench-pipe/", rank, wait, "127.0.0.1")
        limits = Limits(frozenset(Kind), 1 << 20, payload_bytes)
        buffer = torch.zeros(max(payload_bytes, 1), dtype=torch.uint8)

        def alloc(size: int) -> torch.Tensor:
            return buffer[:size]

        def one() -> None:
            if rank == 1:
                pipe.send(Message(Kind.UPLOAD, HEADER, payload), wait)
                pipe.recv(limits, wait, wait, alloc)
            else:
                pipe.recv(limits, wait, wait, alloc)
                pipe.send(Message(Kind.ACK, ACK), wait)
    else:
        options = ProcessGroupGloo._Options()
        options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        options._timeout = wait
        options._threads = 1
        group = ProcessGroupGloo(PrefixStore("bench-raw/", store), rank, 2, options)
        upload = torch.zeros(len(HEADER) + payload_bytes, dtype=torch.uint8)
        answer = torch.zeros(len(ACK), dtype=torch.uint8)

        def one() -> None:
            if rank == 1:
                group.send([upload], 0, 0).wait()
                group.recv([answer], 0, 0).wait()
            else:
                group.recv([upload], 1, 0).wait()
                group.send([answer], 1, 0).wait()

    for _ in range(WARMUP):
        one()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(round_trips):
        one()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if phase == "pipe":
        pipe.close()
    return {"cpu": cpu, "wall": wall}


def run_phase(phase: str, options: argparse.Namespace) -> Dict[str, float]:
    """Both ranks of one phase in fresh processes; per round trip: rank 0's and rank 1's CPU, rank 1's wall."""
    port = _free_port()
    command = [sys.executable, __file__, "--child", phase, "--port", str(port), "--payload", str(options.payload),
               "--round-trips", str(options.round_trips)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*command, "--rank", str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, stdin=subprocess.DEVNULL) for rank in (0, 1)]
    try:
        outs = [proc.communicate(timeout=options.timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for proc, (out, err) in zip(procs, outs):
        if proc.returncode != 0:
            raise RuntimeError(f"phase {phase}: a rank exited {proc.returncode}:\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    n = options.round_trips
    return {"cpu0": results[0]["cpu"] / n, "cpu1": results[1]["cpu"] / n, "wall": results[1]["wall"] / n}


def _band(values: List[float]) -> str:
    return f"{statistics.median(values) * 1e6:7.1f} us ({min(values) * 1e6:.1f}-{max(values) * 1e6:.1f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payload", type=int, default=644, help="bytes of the upload's payload (default 644)")
    parser.add_argument("--round-trips", type=int, default=3000, help="timed round trips per phase and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one phase of one repeat")
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        print(json.dumps(child(options.child, options.rank, options.port, options.payload, options.round_trips)))
        return 0
    if options.payload < 1 or options.round_trips < 1 or options.repeats < 1:
        parser.error("--payload, --round-trips and --repeats must be at least 1")
    print(f"bench/pipe.py: an upload of {len(HEADER)} header bytes and {options.payload} payload bytes and its ACK, "
          f"{options.round_trips} round trips x {options.repeats} repeats; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    runs: Dict[str, List[Dict[str, float]]] = {phase: [] for phase in PHASES}
    for repeat in range(options.repeats):
        for phase in (PHASES if repeat % 2 == 0 else PHASES[::-1]):
            runs[phase].append(run_phase(phase, options))
    print("\nper round trip: median of the repeats (range)")
    print(f"{'phase':>6} | {'CPU rank 0 (answers)':>28} | {'CPU rank 1 (asks)':>28} | {'wall':>28}")
    for phase in PHASES:
        rows = runs[phase]
        print(f"{phase:>6} | {_band([r['cpu0'] for r in rows]):>28} | {_band([r['cpu1'] for r in rows]):>28} | "
              f"{_band([r['wall'] for r in rows]):>28}")
    ratio = {key: statistics.median(r[key] for r in runs["pipe"]) / statistics.median(r[key] for r in runs["raw"])
             for key in ("cpu0", "cpu1", "wall")}
    print(f"\nratio pipe / raw: CPU {ratio['cpu0']:.2f} (rank 0), {ratio['cpu1']:.2f} (rank 1); wall {ratio['wall']:.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs): compare figures only within one run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
