"""Edges of a two-level federation killed with SIGKILL in the middle of a run and each started
again alone with the same command, in real processes: examples/hierarchy.py started by hand, one
process per rank, each in its own session, against the flat federation of the same leaves. The
root and the other edge go on, the children rejoin their restarted edge, every version finishes
and the final weights are the flat federation's, bit for bit. Every process is killed with its
group in a ``finally``; every wait has a deadline."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from openfl_api.simulate import simulate
from test_federation import Processes, free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "hierarchy.py"
DEADLINE = 60
ROUNDS = 4


def start(processes: Processes, tmp_path: Path, port: int, rank: int, *extra: str, name: str = "") -> subprocess.Popen:
    args = [sys.executable, str(SCRIPT), "--init_method", f"tcp://127.0.0.1:{port}", "--world_size", "7",
            "--rank", str(rank), "--fanout", "2", "2", "--rounds", str(ROUNDS), *extra]
    return processes.start(args, log=tmp_path / f"{name or f'rank{rank}'}.log", OPENFL_API_TOKEN="t")


def wait_for(log: Path, text: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE
    while text not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"timed out waiting for {text!r} in {log.name}"
        assert process.poll() is None, f"{log.name}'s process exited before {text!r}: {log.read_text()[-2000:]}"
        time.sleep(0.02)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=DEADLINE) == -signal.SIGKILL


def test_edges_killed_and_restarted_alone_rejoin_and_the_tree_ends_with_the_flat_weights(tmp_path):
    flat = tmp_path / "flat.pt"
    simulate(str(SCRIPT), 5, args=["--fanout", "4", "--rounds", str(ROUNDS), "--out", str(flat)],
             timeout=timedelta(seconds=DEADLINE))
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    # Leaf 3 uploads at once and leaf 4 after a second (edge 1, ranks 3 and 4); leaves 5 and 6 at
    # once too, so edge 2 waits about a second each version for the root's next model.
    common = ("--checkpoint", str(checkpoints), "--out", str(tmp_path / "tree.pt"), "--pace", "0.05", "1.0", "0.05")
    processes = Processes()
    try:
        port = free_port()
        ranks = {rank: start(processes, tmp_path, port, rank, *common) for rank in range(7)}
        # Edge 1 dies with leaf 3's upload of version 1 accepted and leaf 4 still training.
        wait_for(tmp_path / "rank3.log", "uploaded its update of version 1", ranks[3])
        kill(ranks[1])
        ranks[1] = start(processes, tmp_path, port, 1, *common, name="rank1-again")
        # Edge 2 dies with its sum of version 2 accepted by the root, waiting for version 3.
        wait_for(tmp_path / "rank2.log", "exact sum for the parent's version 2; waiting", ranks[2])
        kill(ranks[2])
        ranks[2] = start(processes, tmp_path, port, 2, *common, name="rank2-again")
        for rank, process in sorted(ranks.items()):
            name = f"rank{rank}-again" if rank in (1, 2) else f"rank{rank}"
            assert process.wait(timeout=DEADLINE) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        processes.reap()
    logs = {path.stem: path.read_text() for path in tmp_path.glob("*.log")}
    root = logs["rank0"]
    assert "rank 1 (rank1) left: pipe failed" in root and "rank 2 (rank2) left: pipe failed" in root
    assert root.count("rank 1 (rank1) joined") == 2 and root.count("rank 2 (rank2) joined") == 2
    assert all(f"version {v}: aggregated 2 uploads" in root for v in range(1, ROUNDS + 1))
    # Edge 1 serves version 1 again; leaf 3, whose accepted upload was lost, trains it again.
    assert "rank1.1: version 1, 0 uploads accepted" in logs["rank1-again"]
    assert "edge: serving the parent's version 1 as version 1" in logs["rank1-again"]
    assert "rank1 asks for version 2 but has no accepted upload for version 1; serving version 1" in logs["rank1-again"]
    # The root has edge 2's sum of version 2: the restarted edge 2 goes on at version 3.
    assert "rank2.2: version 2, 0 uploads accepted" in logs["rank2-again"]
    assert "version 3: adopted the parent's version 3" in logs["rank2-again"]
    for leaf in (3, 4, 5, 6):
        assert "lost the backend" in logs[f"rank{leaf}"] and logs[f"rank{leaf}"].count("joined backend") == 2
        assert f"rank {leaf} (leaf) finished at version {ROUNDS}" in logs[f"rank{leaf}"]
    want, got = torch.load(flat, weights_only=True), torch.load(tmp_path / "tree.pt", weights_only=True)
    assert list(want) == list(got)
    assert [name for name in want if not torch.equal(want[name], got[name])] == []
