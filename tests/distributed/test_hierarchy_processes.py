"""A two-level federation in real processes: root, 2 edges and 4 leaves started by
``python -m openfl_api.launch`` from examples/hierarchy.py, against the flat federation of the same
4 leaves, launched too. The final weights are the same, bit for bit, and an edge that waits for
its parent longer than the link timeout keeps its children's links. Every child runs in its own
session and is killed with its group in a ``finally``; every wait has a deadline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "hierarchy.py"
DEADLINE = 120


def free_ports(count: int) -> int:
    """A port ``p`` with ``p .. p + count - 1`` free now (an edge serves on the root's port + its rank)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            held = []
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def launch(ranks: int, fanout: List[str], out: Path, log: Path, *extra: str) -> Tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "OPENFL_", "MASTER_"))}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    args = [sys.executable, "-m", "openfl_api.launch", "--nproc_per_node", str(ranks), "--master_port",
            str(free_ports(ranks)), "--grace", "20", "--logdir", str(log.parent / log.stem), str(SCRIPT),
            "--fanout", *fanout, "--out", str(out), *extra]
    with open(log, "w") as output:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        process.wait(timeout=DEADLINE)
        return process.returncode, log.read_text()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_root_two_edges_four_leaves_launched_give_the_flat_federations_weights_bit_for_bit(tmp_path):
    results = {}
    # In the tree the last leaf takes 4 s per round, longer than the link timeout (3 s): the other
    # edge waits that long for the root's next version, and its children's links must hold.
    for name, ranks, fanout, extra in (("flat", 5, ["4"], ()), ("tree", 7, ["2", "2"], ("--slow", "4"))):
        code, output = launch(ranks, fanout, tmp_path / f"{name}.pt", tmp_path / f"{name}.log", *extra)
        logs = "".join(p.read_text() for p in sorted((tmp_path / name).glob("rank_*.log")))
        assert code == 0, output[-2000:] + logs[-4000:]
        results[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    edge = (tmp_path / "tree" / "rank_1.log").read_text()
    assert "edge: uploaded 2 children's exact sum; serving the parent's version 2" in edge
    for rank in range(7):
        text = (tmp_path / "tree" / f"rank_{rank}.log").read_text()
        for cut in ("lost the link", "lost the backend", "refused a frontend", "pipe failed"):  # no cut link, no rejoin
            assert cut not in text, text[-3000:]
    flat, tree = results["flat"], results["tree"]
    assert list(flat) == list(tree)
    assert all(torch.equal(flat[k], tree[k]) for k in flat), [k for k in flat if not torch.equal(flat[k], tree[k])]
