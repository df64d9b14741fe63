"""Load: one backend and 32 frontends, started by the real launcher, finish every version.

A single run of ``python -m openfl_api.launch --nproc_per_node 33`` (synchronous FedAvg of a tiny
MLP, ``AggregateCount(count=32)``, ``StopAtVersion(3)``) is shared by the tests below; each checks
one thing the run left behind. On 2 CPUs the run takes 40-60 s, most of it 33 imports of torch,
so every wait is generous; the launcher and every rank are reaped whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("scripts") / "load.py"
FRONTENDS = 32
VERSIONS = 3
WAIT_S = 300  # every wait of the API inside the ranks
DEADLINE_S = 420  # the whole run, start-up of 33 processes included

pytestmark = pytest.mark.timeout(DEADLINE_S + 60)


@dataclass(frozen=True)
class Run:
    """What the launcher run left: its exit code and stderr, and the folder of the rank logs."""

    code: int
    err: str
    logs: Path
    seconds: float

    def log(self, rank: int) -> str:
        return (self.logs / f"rank_{rank}.log").read_text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "OPENFL_", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # 33 processes share 2 CPUs; more threads only add switching
    return env


def _reap(launcher: subprocess.Popen, pids: Path) -> None:
    """Stop the launcher, which stops its ranks; if it does not stop, SIGKILL it and them."""
    if launcher.poll() is not None:
        return  # it has waited for every rank
    # The launcher walks SIGINT, SIGTERM, SIGKILL to its ranks; each further signal takes the next
    # step at once, so three signals kill them now.
    for _ in range(3):
        launcher.send_signal(signal.SIGTERM)
    try:
        launcher.wait(timeout=30)
        return
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
    for path in pids.glob("pid_*"):  # ranks lead process groups of their own
        with contextlib.suppress(OSError, ValueError):
            pid = int(path.read_text())
            if str(pids) in Path(f"/proc/{pid}/cmdline").read_text():  # still ours, not a reused pid
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("load")
    pids = folder / "pids"
    pids.mkdir()
    command = [sys.executable, "-m", "openfl_api.launch", "--nproc_per_node", str(FRONTENDS + 1),
               "--logdir", str(folder / "logs"), "--master_port", str(_free_port()), "--grace", "30",
               str(SCRIPT), "--count", str(FRONTENDS), "--max_version", str(VERSIONS),
               "--timeout", str(WAIT_S), "--pid_dir", str(pids)]
    started = time.monotonic()
    launcher = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        _, err = launcher.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        _reap(launcher, pids)
        backend = (folder / "logs" / "rank_0.log")
        tail = backend.read_text()[-3000:] if backend.exists() else "(no backend log)"
        pytest.fail(f"the federation did not finish within {DEADLINE_S} s; backend log ends with:\n{tail}")
    finally:
        _reap(launcher, pids)
    return Run(launcher.returncode, err, folder / "logs", time.monotonic() - started)


def test_every_rank_exits_0(run: Run) -> None:
    exited = re.findall(r"rank (\d+) \((?:backend|frontend)\) exited with code (\S+)", run.err)

    assert (run.code, exited, "no rank failed" in run.err) == (
        0, [(str(rank), "0") for rank in range(FRONTENDS + 1)], True
    ), run.err[-3000:]


def test_every_version_is_aggregated_from_all_32_uploads(run: Run) -> None:
    aggregated = re.findall(r"version (\d+): aggregated (\d+) uploads", run.log(0))

    assert aggregated == [(str(v), str(FRONTENDS)) for v in range(1, VERSIONS + 1)], run.log(0)[-3000:]


def test_the_ledger_has_three_downloads_and_uploads_per_frontend_and_no_discard(run: Run) -> None:
    # The backend's table: Peer | Pending | Finished | Discard | Downloads | Uploads
    rows = {
        peer: tuple(int(n) for n in counts)
        for peer, *counts in re.findall(r"^\|\s*(\S+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|$",
                                        run.log(0), flags=re.MULTILINE)
    }
    per_frontend = (0, 2 * VERSIONS, 0, VERSIONS, VERSIONS)
    expected = {f"openfl_api/rank{rank}": per_frontend for rank in range(1, FRONTENDS + 1)}
    expected["total"] = tuple(FRONTENDS * n for n in per_frontend)

    assert rows == expected, run.log(0)[-6000:]


def test_every_frontend_ends_at_the_last_version_after_one_upload_per_version(run: Run) -> None:
    ends = {rank: re.findall(r"rank \d+ finished at version (\d+) after (\d+) uploads", run.log(rank))
            for rank in range(1, FRONTENDS + 1)}

    assert ends == {rank: [(str(VERSIONS), str(VERSIONS))] for rank in range(1, FRONTENDS + 1)}
