"""Bit for bit with real processes: the same weights whatever the arrival order of the uploads,
and after the backend is SIGKILLed and resumed at any moment of a version.

The script (scripts/exact.py) trains an MLP 12-6-1 on data that is a pure function of (rank,
version), with four frontend processes and AggregateCount(4), so every version sums four uploads:
enough for float addition to depend on their order, had the sum not been exact.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from test_federation import DEADLINE, Processes, free_port

SCRIPT = Path(__file__).with_name("scripts") / "exact.py"
WORLD = 5
COMMON = ("--count", "4", "--max_version", "6", "--log", "DEBUG")


def start(processes, folder: Path, port: int, rank: int, *extra: str, name: str = ""):
    args = [sys.executable, str(SCRIPT), "--init_method", f"tcp://127.0.0.1:{port}", "--world_size", str(WORLD),
            "--rank", str(rank), *COMMON, *extra]
    return processes.start(args, log=folder / f"{name or f'rank{rank}'}.log", OPENFL_API_TOKEN="t",
                           OMP_NUM_THREADS="1")


def federation(processes, folder: Path, *extra: str) -> torch.Tensor:
    folder.mkdir()
    port = free_port()
    ranks = [start(processes, folder, port, rank, *extra, "--result", str(folder / "final.pt")) for rank in range(WORLD)]
    for rank, process in enumerate(ranks):
        assert process.wait(timeout=DEADLINE) == 0, (folder / f"rank{rank}.log").read_text()[-3000:]
    return torch.load(folder / "final.pt", weights_only=True)


def arrival(folder: Path, version: int) -> list:
    log = (folder / "rank0.log").read_text()
    return re.findall(rf"accepted the upload of openfl_api/rank(\d) for version {version}\b", log)


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs by {float((got[name] - want[name]).abs().max())}"


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted federation, uploads arriving as they come."""
    group = Processes()
    try:
        folder = tmp_path_factory.mktemp("exact") / "reference"
        return federation(group, folder)
    finally:
        group.reap()


def test_three_runs_with_the_arrival_order_shuffled_end_with_the_same_weights(processes, tmp_path, reference):
    # The reference is the first run; two more with per-rank delays that reverse the arrival order.
    orders = []
    for index, delays in enumerate(("1=0.09,2=0.06,3=0.03,4=0", "1=0,2=0.03,3=0.06,4=0.09")):
        folder = tmp_path / f"run{index}"
        assert_same(federation(processes, folder, "--delay", delays), reference)
        orders.append(tuple(arrival(folder, 2)))
    assert all(len(order) == 4 for order in orders)
    assert orders[0] != orders[1], f"the delays did not change the arrival order: {orders}"


@pytest.mark.parametrize("moment", ["3=1", "4=3", "2=4"],
                         ids=["at the first upload of version 3", "with two uploads of version 4 accepted",
                              "at the last upload of version 2"])
def test_a_backend_killed_and_resumed_at_any_moment_ends_with_the_uninterrupted_weights(processes, tmp_path,
                                                                                      reference, moment):
    port = free_port()
    checkpoint = tmp_path / "ckpt"
    run = ("--checkpoint", str(checkpoint), "--result", str(tmp_path / "final.pt"))
    backend = start(processes, tmp_path, port, 0, *run, "--kill_backend_at", moment, name="backend-killed")
    frontends = [start(processes, tmp_path, port, rank, *run) for rank in range(1, WORLD)]
    assert backend.wait(timeout=DEADLINE) == -signal.SIGKILL
    resumed = start(processes, tmp_path, port, 0, *run, "--resume", str(checkpoint))
    assert resumed.wait(timeout=DEADLINE) == 0, (tmp_path / "rank0.log").read_text()[-3000:]
    for rank, process in enumerate(frontends, start=1):
        assert process.wait(timeout=DEADLINE) == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "rank0.log").read_text()
    assert_same(torch.load(tmp_path / "final.pt", weights_only=True), reference)
