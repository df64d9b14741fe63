"""Load: one backend and 32 frontends, started by the real launcher, finish every version; a
backend short of file descriptors refuses the frontends it cannot take instead of dying.

A single run of ``python -m openfl_api.launch --nproc_per_node 33`` (synchronous FedAvg of a tiny
MLP, ``AggregateCount(count=32)``, ``StopAtVersion(3)``) is shared by the first tests; each checks
one thing the run left behind; so do the last tests with a run of 13 processes under
``ulimit -n 68``. On 2 CPUs the runs take 40-60 s and 25-30 s, most of it imports of torch, so
every wait is generous; the launcher and every rank are reaped whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("scripts") / "load.py"
DESCRIPTORS_SCRIPT = Path(__file__).with_name("scripts") / "descriptors.py"
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


def _launch(folder: Path, nproc: int, script: Path, *script_args: str, descriptors: Optional[int] = None) -> Run:
    """Run the launcher to its end with a log folder and a pid folder in ``folder``."""
    pids = folder / "pids"
    pids.mkdir()
    command = [sys.executable, "-m", "openfl_api.launch", "--nproc_per_node", str(nproc),
               "--logdir", str(folder / "logs"), "--master_port", str(_free_port()), "--grace", "120",
               str(script), *script_args]

    def limit_descriptors() -> None:  # in the launcher's process, before exec; its ranks inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    launcher = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True,
                                preexec_fn=limit_descriptors if descriptors is not None else None)
    try:
        _, err = launcher.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        _reap(launcher, pids)
        backend = (folder / "logs" / "rank_0.log")
        tail = backend.read_text()[-3000:] if backend.exists() else "(no backend log)"
        pytest.fail(f"the ranks did not finish within {DEADLINE_S} s; the backend's log ends with:\n{tail}")
    finally:
        _reap(launcher, pids)
    return Run(launcher.returncode, err, folder / "logs")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("load")
    return _launch(folder, FRONTENDS + 1, SCRIPT, "--count", str(FRONTENDS), "--max_version", str(VERSIONS),
                   "--timeout", str(WAIT_S), "--pid_dir", str(folder / "pids"))


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


# --- a backend short of file descriptors --------------------------------------------------------

SHORT_FRONTENDS = 12
# ulimit -n: room for a few pipes, not for 12. The backend opens ~30 before any pipe (12 of them the
# frontends' store connections); each pipe needs 2 (its socket and the store connection), 32 stay spare.
SHORT_LIMIT = 68


@dataclass(frozen=True)
class Admission:
    """Who the backend admitted and refused (and why), and what each frontend was told."""

    run: Run
    admitted: list
    refused: dict
    told: dict


@pytest.fixture(scope="module")
def short_of_descriptors(tmp_path_factory: pytest.TempPathFactory) -> Admission:
    folder = tmp_path_factory.mktemp("descriptors")
    result = folder / "result"
    run = _launch(folder, SHORT_FRONTENDS + 1, DESCRIPTORS_SCRIPT, "--result", str(result),
                  "--pid_dir", str(folder / "pids"), descriptors=SHORT_LIMIT)
    backend = json.loads(result.read_text()) if result.exists() else {"admitted": [], "refused": {}}
    told = {rank: json.loads(Path(f"{result}.{rank}").read_text())
            for rank in range(1, SHORT_FRONTENDS + 1) if Path(f"{result}.{rank}").exists()}
    return Admission(run, backend["admitted"], {int(k): v for k, v in backend["refused"].items()}, told)


def test_a_backend_short_of_file_descriptors_is_not_killed(short_of_descriptors: Admission) -> None:
    run = short_of_descriptors.run
    # Before the lobby checked its descriptors, gloo aborted the backend ("accept: Too many open
    # files") or a handshake thread died and left its frontend waiting.
    assert (run.code, "rank 0 (backend) exited with code 0" in run.err) == (0, True), run.err[-3000:] + run.log(0)[-3000:]


def test_the_backend_admits_some_frontends_and_refuses_the_others(short_of_descriptors: Admission) -> None:
    admitted, refused = short_of_descriptors.admitted, short_of_descriptors.refused

    assert (sorted(admitted + list(refused)), bool(admitted), bool(refused)) == (
        list(range(1, SHORT_FRONTENDS + 1)), True, True
    ), (admitted, refused)


def test_a_refused_frontend_is_told_the_backend_is_short_of_descriptors(short_of_descriptors: Admission) -> None:
    told = {rank: short_of_descriptors.told.get(rank, {}).get("refused", "(nothing)")
            for rank in short_of_descriptors.refused}
    reasons = {rank: re.sub(r": \d+ of its \d+ file descriptors \(ulimit -n\) are open.*", ": <count>", message)
               for rank, message in told.items()}

    assert reasons == {rank: f"the backend refused this frontend: the backend cannot take rank {rank}: <count>"
                       for rank in short_of_descriptors.refused}
