"""Virtual clients in real processes: memory of a 1,000-client simulation, and the same weights
whether one process hosts every client or three or four launched processes share them, with
per-client optimizer state (SGD momentum kept in ClientStates).

Both run examples/virtual_clients.py unchanged, once under ``python -m openfl_api.simulate`` and
once under ``python -m openfl_api.launch``. Every child runs in its own session and is killed with
its group in a ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "virtual_clients.py"
DEADLINE = 180
SMALL = ["--clients", "48", "--fraction", "0.25", "--rounds", "4", "--seed", "11", "--features", "20",
         "--hidden", "16", "--momentum", "0.5"]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "OPENFL_", "MASTER_"))}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.pop("OMP_NUM_THREADS", None)  # each command's own default: one thread per rank
    return env


def run(args: List[str], log: Path) -> Tuple[int, str, int]:
    """Run ``python args`` in its own session; ``(exit code, output, peak RSS in KiB)``."""
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return process.returncode, log.read_text(), usage.ru_maxrss
            assert time.monotonic() < deadline, f"{args[:3]} did not finish within {DEADLINE} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_a_thousand_clients_a_hundred_per_round_ten_rounds_stay_under_1_gb(tmp_path):
    code, output, peak_kib = run(["-m", "openfl_api.simulate", "--nproc_per_node", "2", str(SCRIPT),
                                  "--clients", "1000", "--fraction", "0.1", "--rounds", "10"], tmp_path / "log")
    assert code == 0, output[-3000:]
    assert "backend: version 10" in output and "rank 1: 1000 client updates from 1000 hosted clients" in output
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


def test_one_process_hosting_all_clients_and_three_or_four_launched_processes_give_identical_weights(tmp_path):
    code, output, _ = run(["-m", "openfl_api.simulate", "--nproc_per_node", "2", str(SCRIPT), *SMALL,
                           "--states", str(tmp_path / "one"), "--save", str(tmp_path / "one.pt")], tmp_path / "one.log")
    assert code == 0, output[-3000:]
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    for frontends in (3, 4):
        name = f"launched{frontends}"
        code, output, _ = run(["-m", "openfl_api.launch", "--nproc_per_node", str(frontends + 1), "--grace", "20",
                               str(SCRIPT), *SMALL, "--states", str(tmp_path / name), "--save",
                               str(tmp_path / f"{name}.pt")], tmp_path / f"{name}.log")
        assert code == 0, output[-3000:]
        assert sum(f"rank {r}:" in output for r in range(1, frontends + 1)) == frontends  # they shared the clients
        launched = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert list(one) == list(launched)
        assert all(torch.equal(one[key], launched[key]) for key in one), f"{frontends} frontends differ"
