"""The protected wire's cost: upload throughput of a ResNet-18-sized state_dict over one gloo pipe
on loopback, sealed (AES-256-GCM) as a ratio to plain, measured in the same run.

    python bench/wire.py [--repeats 9]

Two processes, one torch thread each: a frontend sends the state_dict's tensors as an UPLOAD
(pieces straight from the tensors, 46.8 MB, bench/transfer.py's model) and the backend receives it
into one buffer and answers with an ACK; the time is the frontend's, from the send to the ACK. Two
pipes join the processes, one plain and one sealed, and each repeat times one upload on each, so
both modes see the same load. Reported: the median seconds and MB/s of each mode over
``--repeats`` (after one warm-up each), the spread (min-max), sealed/plain throughput, and the
CPU time both processes spent per upload (all their threads): on a machine whose cores are all
busy, throughput follows the CPU time rather than the overlap of the two sides' threads.

Compare figures within one run only: a shared machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from openfl_api.transport.base import REPLIES, REQUESTS, Kind, Limits, Message, Pieces  # noqa: E402
from openfl_api.transport.gloo import open_gloo_pipe  # noqa: E402
from openfl_api.transport.wire import SealedPipe, WireKeys  # noqa: E402

TIMEOUT = timedelta(seconds=120)
KEYS = WireKeys(bytes(range(32)), bytes(range(32, 64)))  # fixed keys: the handshake is not measured


def payload() -> Pieces:
    """The ResNet-18-sized state_dict as an upload's pieces, each tensor at an 8-byte aligned offset."""
    from transfer import build_model

    pieces, offset = [], 0
    for tensor in build_model(0).state_dict().values():
        data = tensor.detach().reshape(-1).view(torch.uint8)
        pieces.append((offset, data))
        offset += (data.numel() + 7) // 8 * 8
    return Pieces(offset, tuple(pieces))


def side(rank: int, port: int, repeats: int, results) -> None:
    torch.set_num_threads(1)
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", port, None, rank == 0, timeout=TIMEOUT, wait_for_workers=False)
    plain = open_gloo_pipe(store, "plain/", rank, TIMEOUT, "127.0.0.1")
    keys = KEYS if rank == 0 else WireKeys(KEYS.recv, KEYS.send)
    sealed = SealedPipe(open_gloo_pipe(store, "sealed/", rank, TIMEOUT, "127.0.0.1"), keys)
    pipes = {"plain": plain, "sealed": sealed}
    if rank == 0:
        buffer = torch.empty(0, dtype=torch.uint8)

        def alloc(size: int) -> torch.Tensor:
            nonlocal buffer
            if buffer.numel() < size:
                buffer = torch.empty(size, dtype=torch.uint8)
            return buffer[:size]

        cpu = {name: [] for name in pipes}
        for repeat in range(repeats + 1):
            for name, pipe in pipes.items():
                started = cpu_time()
                pipe.recv(Limits(REQUESTS, 1 << 16, 1 << 27), TIMEOUT, TIMEOUT, alloc)
                pipe.send(Message(Kind.ACK, b"{}"), TIMEOUT)
                if repeat:
                    cpu[name].append(cpu_time() - started)
        results.put({"side": "backend", "cpu": cpu})
        return
    upload = payload()
    times = {name: [] for name in pipes}
    cpu = {name: [] for name in pipes}
    for repeat in range(repeats + 1):
        for name, pipe in pipes.items():
            started, used = time.perf_counter(), cpu_time()
            pipe.send(Message(Kind.UPLOAD, b"{}", upload), TIMEOUT)
            pipe.recv(Limits(REPLIES, 1 << 16, 0), TIMEOUT, TIMEOUT, lambda size: torch.empty(size, dtype=torch.uint8))
            if repeat:  # the first of each is a warm-up
                times[name].append(time.perf_counter() - started)
                cpu[name].append(cpu_time() - used)
    results.put({"side": "frontend", "bytes": upload.nbytes, "times": times, "cpu": cpu})


def cpu_time() -> float:
    """Seconds of CPU this process has used, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=side, args=(rank, port, args.repeats, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    sides = {outcome["side"]: outcome for outcome in (results.get(timeout=600), results.get(timeout=600))}
    for process in processes:
        process.join(60)
    outcome = sides["frontend"]
    size = outcome["bytes"]
    rows = {}
    for name, times in outcome["times"].items():
        median = statistics.median(times)
        cpu = statistics.median(a + b for a, b in zip(outcome["cpu"][name], sides["backend"]["cpu"][name]))
        rows[name] = {"median_s": median, "MB_per_s": size / median / 1e6, "min_s": min(times), "max_s": max(times),
                      "cpu_s": cpu}
        print(f"{name:7s} {median * 1e3:8.1f} ms  {size / median / 1e6:8.1f} MB/s  "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f} ms, {len(times)} uploads of "
              f"{size / 1e6:.1f} MB); CPU {cpu * 1e3:.1f} ms per upload, both sides")
    ratio = rows["plain"]["median_s"] / rows["sealed"]["median_s"]
    cpu_ratio = rows["plain"]["cpu_s"] / rows["sealed"]["cpu_s"]
    print(f"sealed / plain throughput: {ratio:.2f} (goal >= 0.8); plain / sealed CPU time: {cpu_ratio:.2f}")
    print(json.dumps({"rows": rows, "ratio": ratio, "cpu_ratio": cpu_ratio}))


if __name__ == "__main__":
    main()
