"""Real federations: real processes started by the real launcher, gloo pipes over loopback sockets.

Every process runs in its own session and is killed with its group in a ``finally``; every wait
has a deadline; every test uses fresh ports and files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

import openfl_api as ofl

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("scripts") / "federation.py"
DEADLINE = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "OPENFL_", "MASTER_"))}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra)
    return env


class Processes:
    """Started processes, reaped whatever happens."""

    def __init__(self) -> None:
        self.started: List[subprocess.Popen] = []

    def start(self, args: List[str], log: Optional[Path] = None, **env: str) -> subprocess.Popen:
        out = open(log, "w") if log else subprocess.PIPE
        process = subprocess.Popen(args, cwd=ROOT, env=child_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        self.started.append(process)
        return process

    def reap(self) -> None:
        for process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


FAILED_RANK = re.compile(r"rank \d+ exited with code (?!0\b)")


def launch(processes: Processes, tmp_path: Path, nproc: int, script: Path, *script_args: str,
           launcher_args: tuple = (), fail_fast: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` under the launcher until it exits (at most DEADLINE seconds). ``fail_fast``: stop
    the whole run as soon as the launcher reports a rank that failed, instead of waiting for the
    others (the federation goes on without a failed frontend, so its backend may wait long)."""
    logdir = tmp_path / "logs"
    args = [sys.executable, "-m", "openfl_api.launch", "--nproc_per_node", str(nproc), "--logdir", str(logdir),
            "--master_port", str(free_port()), *launcher_args, str(script), *script_args]
    process = processes.start(args, **env)
    if not fail_fast:
        stdout, _ = process.communicate(timeout=DEADLINE)
        return subprocess.CompletedProcess(args, process.returncode, stdout, "")
    lines: List[str] = []
    failed = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if FAILED_RANK.search(line):
                failed.set()
        failed.set()  # end of output: the launcher exited

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    failed.wait(timeout=DEADLINE)
    if process.poll() is None:
        time.sleep(1.0)  # the launcher's lines about the failed rank's log follow its first line
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    reader.join(timeout=30)
    return subprocess.CompletedProcess(args, process.returncode, "".join(lines), "")


def log_of(tmp_path: Path, rank: int) -> str:
    return (tmp_path / "logs" / f"rank_{rank}.log").read_text()


@pytest.mark.parametrize("nproc,init", [(3, "tcp"), (5, "tcp"), (3, "file")])
def test_the_demo_runs_through_the_launcher(processes, tmp_path, nproc, init):
    launcher_args = ("--init_method", f"file://{tmp_path}/federation.store") if init == "file" else ()
    result = launch(processes, tmp_path, nproc, ROOT / "demo.py", launcher_args=launcher_args)
    assert result.returncode == 0, result.stdout + log_of(tmp_path, 0)
    backend = log_of(tmp_path, 0)
    for version in (1, 2, 3):
        assert f"version {version}: aggregated" in backend
    assert "| Pending | Finished | Discard |" in backend
    for rank in range(1, nproc):
        assert "finished at version 3" in log_of(tmp_path, rank)


@pytest.mark.parametrize("buffer", [1, 2])
def test_the_asynchronous_demo_with_frontends_of_different_speeds_logs_staleness(processes, tmp_path, buffer):
    result = launch(processes, tmp_path, 4, ROOT / "demo.py", "--asynchronous", "--buffer", str(buffer))
    assert result.returncode == 0, result.stdout + log_of(tmp_path, 0)
    backend = log_of(tmp_path, 0)
    assert "version 12: aggregated" in backend
    staleness = [int(m) for m in re.findall(r"accepted the upload of \S+: trained from version \d+, staleness (\d+)", backend)]
    assert len(staleness) >= 12 * buffer
    assert max(staleness) >= 1  # the slow frontends train from versions the fast one has moved past


def test_the_openfed_readme_demo_runs_to_the_same_end(processes, tmp_path):
    result = launch(processes, tmp_path, 3, ROOT / "examples" / "openfed_readme_demo.py")
    assert result.returncode == 0, result.stdout
    assert "version 3: aggregated" in log_of(tmp_path, 0)
    for rank in (1, 2):
        frontend = log_of(tmp_path, rank)
        assert "Downloading failed." in frontend
        assert f"Exit Client @rank{rank}." in frontend


def test_a_sigkilled_frontend_leaves_the_others_and_the_backend_to_finish(processes, tmp_path):
    # Rank 3 uploads once, then dies; ranks 1 and 2 start only after that, and carry on alone.
    result = launch(processes, tmp_path, 4, SCRIPT, "--count", "2", "--max_version", "4", "--die_rank", "3",
                    "--wait_for", str(tmp_path / "rank3-died"))
    assert result.returncode == 0, result.stdout
    assert "failed ranks: 3" in result.stdout
    backend = log_of(tmp_path, 0)
    assert "rank 3 (rank3) left: pipe failed" in backend
    assert "version 4: aggregated" in backend
    for rank in (1, 2):
        assert "Traceback" not in log_of(tmp_path, rank)


def test_tampered_payloads_over_real_pipes_are_refused_and_the_model_is_unchanged(processes, tmp_path):
    result_prefix = tmp_path / "result"
    result = launch(processes, tmp_path, 2, SCRIPT, "--count", "1", "--max_version", "1", "--rogue",
                    "--constant", "2.0", "--result", str(result_prefix))
    assert result.returncode == 0, result.stdout + log_of(tmp_path, 1)
    rogue = json.loads(Path(f"{result_prefix}.1").read_text())["tampered"]
    assert set(rogue) == {"shape", "dtype", "size", "nan", "inf", "garbage", "name", "future", "header too large"}
    for case, outcome in rogue.items():
        assert outcome["accepted"] is False, case
        assert outcome["unchanged"], case
    for case in ("shape", "dtype", "size", "nan", "inf", "garbage", "name"):
        assert rogue[case]["reason"].startswith("invalid payload"), case
    assert rogue["future"]["reason"].startswith("future: trained from version 99")
    assert rogue["header too large"]["reason"] == "pipe closed"
    backend = json.loads(Path(f"{result_prefix}.0").read_text())
    assert backend["reasons"] == {"invalid payload": 7, "future": 1, "invalid message": 1}
    assert backend["totals"]["Discard"] == 9
    assert backend["version"] == 1
    assert backend["weight"] == [[2.0, 2.0, 2.0]]  # only the valid upload reached the model


def test_a_peer_with_a_wrong_token_is_refused_and_the_federation_goes_on(processes, tmp_path):
    port = free_port()
    flag = tmp_path / "rogue-done"
    common = ["--init_method", f"tcp://127.0.0.1:{port}", "--world_size", "3", "--count", "1", "--max_version", "2"]
    backend = processes.start([sys.executable, str(SCRIPT), *common, "--rank", "0"],
                              log=tmp_path / "backend.log", OPENFL_API_TOKEN="right")
    honest = processes.start([sys.executable, str(SCRIPT), *common, "--rank", "1", "--wait_for", str(flag)],
                             log=tmp_path / "honest.log", OPENFL_API_TOKEN="right")
    rogue = processes.start([sys.executable, str(SCRIPT), *common, "--rank", "2"], OPENFL_API_TOKEN="wrong")
    rogue_out, _ = rogue.communicate(timeout=DEADLINE)
    flag.touch()
    assert backend.wait(timeout=DEADLINE) == 0
    assert honest.wait(timeout=DEADLINE) == 0
    assert rogue.returncode != 0
    assert "AdmissionError" in rogue_out and "wrong token" in rogue_out
    backend_log = (tmp_path / "backend.log").read_text()
    assert "refused a frontend (rank 2)" in backend_log
    assert "version 2: aggregated" in backend_log


def test_an_address_added_to_the_watched_file_is_joined_while_the_backend_runs(processes, tmp_path):
    first = ofl.Address(init_method=f"tcp://127.0.0.1:{free_port()}", world_size=2, rank=0, group_name="site-a")
    second = ofl.Address(init_method=f"tcp://127.0.0.1:{free_port()}", world_size=2, rank=0, group_name="site-b")
    address_file = tmp_path / "federation.json"
    ofl.dump_address_file(address_file, [first])
    backend_log = tmp_path / "backend.log"
    backend = processes.start([sys.executable, str(SCRIPT), "--rank", "0", "--address_file", str(address_file),
                               "--count", "2", "--max_version", "2"], log=backend_log, OPENFL_API_TOKEN="t")
    frontend = [sys.executable, str(SCRIPT), "--rank", "1", "--world_size", "2"]
    processes.start([*frontend, "--init_method", first.init_method, "--group_name", "site-a"],
                    log=tmp_path / "a.log", OPENFL_API_TOKEN="t")
    deadline = time.monotonic() + DEADLINE
    while "rank 1 (rank1) joined" not in backend_log.read_text():
        assert time.monotonic() < deadline, "the first frontend never joined"
        assert backend.poll() is None, backend_log.read_text()
        time.sleep(0.05)  # polling a log file the backend writes, with a deadline
    ofl.dump_address_file(address_file, [first, second])
    late = processes.start([*frontend, "--init_method", second.init_method, "--group_name", "site-b"],
                           log=tmp_path / "b.log", OPENFL_API_TOKEN="t")
    assert backend.wait(timeout=DEADLINE) == 0, backend_log.read_text()
    assert late.wait(timeout=DEADLINE) == 0
    text = backend_log.read_text()
    assert f"serving {second.init_method}" in text
    assert f"joined on {second.init_method}" in text
    assert "version 2: aggregated 2 uploads" in text  # both addresses contributed
