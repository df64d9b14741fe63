"""Every algorithm of openfl_api.strategies and openfl_api.aggregate with real processes: the same weights
under ``simulate`` and the launcher, and after the backend is SIGKILLed mid-version and resumed.

scripts/strategies.py runs all sixteen algorithms at once, each in a federation of its own (one
thread per algorithm in every rank), with the data, clients and local epochs of
examples/strategies_federation.py. The reference runs under ``simulate`` in this process (one
frontend hosting the five clients); the launcher's run shares the clients between two frontend
processes; the killed run gives each client a frontend process of its own, so that the upload the
backend accepted and then lost with its process is trained again by a frontend that has no other
upload in that version. Bulyan runs with f = 0 here (five uploads; f = 1 needs seven).
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest
import torch

from openfl_api.simulate import simulate
from test_federation import DEADLINE, ROOT, Processes, launch, log_of

SCRIPT = Path(__file__).with_name("scripts") / "strategies.py"
sys.path.insert(0, str(ROOT / "examples"))
from strategies_federation import ALGORITHMS  # noqa: E402

COMMON = ["--clients", "5", "--per_round", "5", "--rounds", "3", "--epochs", "2", "--work", "variable",
          "--samples", "12", "--features", "8", "--f", "1", "--bulyan_f", "0", "--mu", "0.1", "--lr", "0.05",
          "--batch", "4", "--link_timeout", "30"]


def ports_free(first: int, count: int) -> bool:
    for port in range(first, first + count):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_ports(count: int) -> int:
    """A port with the ``count`` ports after it free too (each algorithm's federation takes one)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = sock.getsockname()[1]
        if first + count < 65536 and ports_free(first, count + 1):
            return first
    raise RuntimeError(f"found no {count + 1} consecutive free ports")


def weights(folder: Path) -> dict:
    return {a: torch.load(folder / f"{a}.pt", weights_only=True) for a in ALGORITHMS}


def assert_same(got: dict, want: dict) -> None:
    for algorithm in ALGORITHMS:
        for name in want[algorithm]:
            assert torch.equal(got[algorithm][name], want[algorithm][name]), (
                f"{algorithm}: {name} differs by {float((got[algorithm][name] - want[algorithm][name]).abs().max())}")


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Every algorithm under simulate: the backend and one frontend hosting the five clients."""
    folder = tmp_path_factory.mktemp("simulated")
    threads = torch.get_num_threads()
    try:
        simulate(SCRIPT, nproc_per_node=2, args=[*COMMON, "--out", str(folder)])
    finally:
        torch.set_num_threads(threads)
    return weights(folder)


def test_every_algorithm_gives_the_same_weights_under_simulate_and_the_launcher(processes, tmp_path, reference):
    out = tmp_path / "out"
    out.mkdir()
    result = launch(processes, tmp_path, 3, SCRIPT, *COMMON, "--out", str(out),
                    "--init_method", f"tcp://127.0.0.1:{free_ports(len(ALGORITHMS) + 1)}", fail_fast=True)
    logs = [log_of(tmp_path, rank)[-3000:] for rank in range(3) if (tmp_path / "logs" / f"rank_{rank}.log").exists()]
    assert result.returncode == 0, "\n".join([result.stdout[-3000:], *logs])
    assert_same(weights(out), reference)


def test_every_algorithm_survives_a_backend_killed_mid_version_and_resumed(processes, tmp_path, reference):
    world = 6  # the backend and one frontend per client
    args = [*COMMON, "--out", str(tmp_path), "--log", "INFO", "--world_size", str(world),
            "--init_method", f"tcp://127.0.0.1:{free_ports(len(ALGORITHMS) + 1)}"]

    def start(rank, *extra, name):
        return processes.start([sys.executable, str(SCRIPT), *args, "--rank", str(rank), *extra],
                               log=tmp_path / f"{name}.log", OPENFL_API_TOKEN="t", OMP_NUM_THREADS="1")

    backend = start(0, "--kill", name="killed")
    frontends = [start(rank, name=f"rank{rank}") for rank in range(1, world)]
    assert backend.wait(timeout=DEADLINE) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    resumed = start(0, "--resume", "yes", name="resumed")
    assert resumed.wait(timeout=DEADLINE) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    for rank, process in enumerate(frontends, start=1):
        assert process.wait(timeout=DEADLINE) == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    assert log.count("resumed from") == len(ALGORITHMS) and log.count(", 0 uploads accepted") == len(ALGORITHMS)
    assert_same(weights(tmp_path), reference)
