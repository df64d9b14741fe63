"""Heartbeats over real gloo pipes on loopback, every rank a thread of this process: a download
held longer than the link timeout stays connected, on a plain and on a protected wire."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Dict, List

import pytest
import torch
from loguru import logger

import openfl_api as ofl
from openfl_api import aggregate

WAIT = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make(frontend: bool, rank: int, init_method: str, protect: bool) -> ofl.API:
    api = ofl.API(frontend=frontend, token="t", protect_wire=protect, heartbeat=timedelta(seconds=0.2),
                  link_timeout=timedelta(seconds=0.6), drain=timedelta(seconds=2))
    if not frontend:
        api.set_aggregate_triggers(ofl.AggregateCount(count=2))
        api.register_step(ofl.StopAtVersion(max_version=2))
    api.build_connection(address=ofl.Address(init_method=init_method, world_size=3, rank=rank))
    net = torch.nn.Linear(3, 1)
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
    api.set_state_dict(net.state_dict(keep_vars=True))
    return api


@pytest.mark.parametrize("protect", [False, True], ids=["plain", "protected"])
def test_a_download_held_longer_than_the_link_timeout_stays_connected(protect: bool) -> None:
    init_method = f"tcp://127.0.0.1:{free_port()}"
    warnings: List[str] = []
    sink = logger.add(lambda line: warnings.append(str(line)), level="WARNING")
    finished: Dict[str, int] = {}

    def backend() -> None:
        api = make(False, 0, init_method, protect)
        with api:
            api.run()
        api.finish()
        finished["backend"] = api.version

    def frontend(rank: int, pause: float) -> None:
        api = make(True, rank, init_method, protect)
        with api:
            api.run()
            while api.download():
                time.sleep(pause)  # rank 2 trains for 4 link timeouts: rank 1's next download is held
                if not api.upload(num_samples=1):
                    break
                api.update_version()
        api.finish()
        finished[f"rank {rank}"] = api.version

    threads = [threading.Thread(target=backend, daemon=True)]
    threads += [threading.Thread(target=frontend, args=(rank, pause), daemon=True) for rank, pause in ((1, 0), (2, 2.4))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    finally:
        logger.remove(sink)
    assert finished == {"backend": 2, "rank 1": 2, "rank 2": 2}
    assert not [line for line in warnings if "left" in line or "lost" in line], warnings
