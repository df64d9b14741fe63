"""Ordinary mistakes end in a clear message within a bound, with real processes and the real launcher.

Each test makes one mistake a new user makes (a frontend that never starts, no backend, a smaller
model, no rank, frontends that start late, Ctrl-C, a backend that goes away) and checks the line
the user reads and how soon it comes. The script is scripts/mistakes.py; every process is reaped.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from test_federation import ROOT, Processes, free_port

SCRIPT = Path(__file__).with_name("scripts") / "mistakes.py"
STARTUP = 30.0  # importing torch in a few processes on 2 loaded CPUs


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


def start_launcher(processes: Processes, tmp_path: Path, nproc: int, *script_args: str, grace: float = 3,
                   **env: str):
    args = [sys.executable, "-m", "openfl_api.launch", "--nproc_per_node", str(nproc), "--logdir",
            str(tmp_path / "logs"), "--master_port", str(free_port()), "--grace", str(grace), str(SCRIPT),
            *script_args]
    return processes.start(args, log=tmp_path / "launcher.log", **env)


def wait_for_line(path: Path, pattern: str, timeout: float, process=None) -> re.Match:
    """Wait until a line of ``path`` matches ``pattern``; fail with the file's tail after ``timeout``."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while True:
        text = path.read_text() if path.exists() else ""
        found = regex.search(text)
        if found:
            return found
        if time.monotonic() > deadline or (process is not None and process.poll() is not None and not found):
            if process is not None and process.poll() is not None:
                text = path.read_text() if path.exists() else ""
                found = regex.search(text)
                if found:
                    return found
            raise AssertionError(f"no line matching {pattern!r} in {path} within {timeout} s:\n{text[-3000:]}")
        time.sleep(0.05)


def log(tmp_path: Path, rank: int) -> Path:
    return tmp_path / "logs" / f"rank_{rank}.log"


def exit_within(process, seconds: float) -> int:
    try:
        return process.wait(timeout=seconds)
    except Exception:
        raise AssertionError(f"the process did not exit within {seconds} s") from None


def test_a_version_stalled_by_a_frontend_that_never_started_names_what_it_waits_for(processes, tmp_path):
    # world_size 4, AggregateCount(3); rank 3 exits before it joins.
    launcher = start_launcher(processes, tmp_path, 4, "--count", "3", "--crash_rank", "3", "--status", "1")
    wait_for_line(log(tmp_path, 0), r"rank 2 \(rank2\) joined", STARTUP, launcher)
    found = wait_for_line(log(tmp_path, 0), r"version 0: 2 of 3 uploads \(from 1, 2\); waiting for 3; "
                                             r"connected: 1, 2\. (.*)", 3.0, launcher)
    assert found.group(1).startswith(
        "The connected frontends cannot complete it: AggregateCount(count=3) needs 1 more upload and only 0 "
        "connected clients have yet to upload; start 3 or lower the count the step needs")
    # The frontends waiting for version 1 say so too, with the backend's status.
    wait_for_line(log(tmp_path, 1), r"still waiting for the model of version 1 or later from backend at "
                                    r"tcp://\S+; the backend says: version 0: 2 of 3 uploads", 5.0, launcher)


def test_a_frontend_without_a_backend_retries_with_a_line_per_attempt_then_fails_within_the_connect_timeout(
        processes, tmp_path):
    port = free_port()
    out = tmp_path / "frontend.log"
    started = time.monotonic()
    frontend = processes.start([sys.executable, str(SCRIPT), "--connect", "4"], log=out, RANK="1", WORLD_SIZE="2",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = exit_within(frontend, STARTUP + 4)
    text = out.read_text()
    assert code == 1
    assert re.search(rf"no backend at tcp://127\.0\.0\.1:{port} yet \(Connection refused\); attempt 1, trying "
                     r"again in 0\.25 s, giving up in \d s", text), text
    assert "attempt 3," in text
    assert re.search(rf"TransportError: no backend at tcp://127\.0\.0\.1:{port}: nothing answered within 0:00:04 "
                     r"\(\d+ attempts, last: Connection refused\)\. Start the backend \(rank 0\) first", text), text
    assert time.monotonic() - started < STARTUP + 4


def test_ctrl_c_stops_a_frontend_waiting_for_its_backend_within_2_s(processes, tmp_path):
    out = tmp_path / "frontend.log"
    frontend = processes.start([sys.executable, str(SCRIPT)], log=out, RANK="1", WORLD_SIZE="2",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    wait_for_line(out, r"attempt 2,", STARTUP, frontend)
    frontend.send_signal(signal.SIGINT)
    assert exit_within(frontend, 2.0) in (-signal.SIGINT, 128 + signal.SIGINT)


def test_ctrl_c_stops_a_launched_federation_blocked_in_a_held_download_within_2_s(processes, tmp_path):
    # AggregateCount(3) with two frontends: both upload for version 0, then wait for version 1 in a
    # download the backend holds (a gloo receive on the frontends, the serve loop on the backend).
    launcher = start_launcher(processes, tmp_path, 3, "--count", "3", "--status", "1")
    wait_for_line(log(tmp_path, 2), r"still waiting for the model of version 1 or later", STARTUP, launcher)
    started = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    assert exit_within(launcher, 2.0) == 128 + signal.SIGINT
    assert time.monotonic() - started < 2.0
    summary = (tmp_path / "launcher.log").read_text()
    for rank in (0, 1, 2):
        assert re.search(rf"rank {rank} \(\w+\) exited with code -2 \(SIGINT\)", summary), summary


def test_a_frontend_whose_model_differs_is_refused_on_both_sides_within_5_s(processes, tmp_path):
    launcher = start_launcher(processes, tmp_path, 3, "--count", "1", "--small_rank", "2", "--max_version", "50")
    joined = wait_for_line(log(tmp_path, 2), r"(\d\d:\d\d:\d\d\.\d+) \| INFO .* joined backend", STARTUP, launcher)
    serving = wait_for_line(log(tmp_path, 0), r"(\d\d:\d\d:\d\d\.\d+) \| INFO .* serve loop started", STARTUP, launcher)
    expected = (r"its model does not match the backend's: shapes differ: 0\.weight is \(6, 4\) in the backend's and "
                r"\(3, 4\) in the frontend's model; 0\.bias is \(6,\) in the backend's and \(3,\) in the frontend's "
                r"model; 2\.weight is \(1, 6\) in the backend's and \(1, 3\) in the frontend's model\. Build the same "
                r"model, with the same aggregator and optimizer state, on every rank")
    backend = wait_for_line(log(tmp_path, 0), r"(\d\d:\d\d:\d\d\.\d+) \| ERROR .* refused openfl_api/rank2 \(rank2\): "
                            + expected, 5.0, launcher)
    frontend = wait_for_line(log(tmp_path, 2), r"(\d\d:\d\d:\d\d\.\d+) \| ERROR .* the backend refused: " + expected,
                             5.0, launcher)
    # From the moment both sides are up (the frontend joined, the backend's loop runs).
    ready = max(_seconds(joined.group(1)), _seconds(serving.group(1)))
    for seen in (backend, frontend):
        assert _seconds(seen.group(1)) - ready < 5.0
    wait_for_line(log(tmp_path, 2), r"ConfigurationError: the backend refused: its model does not match", 10.0)


def _seconds(clock: str) -> float:
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_a_script_started_without_a_rank_says_it_is_the_backend_and_how_to_start_the_others(processes, tmp_path):
    out = tmp_path / "demo.log"
    port = free_port()
    demo = processes.start([sys.executable, str(ROOT / "demo.py")], log=out, MASTER_PORT=str(port))
    wait_for_line(out, rf"no rank given \(neither --rank nor RANK\): this process is the backend, rank 0, of "
                       rf"tcp://localhost:{port} with world_size 2\. Start each frontend with python \S*demo\.py "
                       r"--rank 1 --world_size 2, or start every rank at once with python -m openfl_api\.launch "
                       r"--nproc_per_node 2 \S*demo\.py", STARTUP, demo)
    wait_for_line(out, r"serve loop started at version 0", STARTUP, demo)
    demo.send_signal(signal.SIGINT)
    assert exit_within(demo, 2.0) in (-signal.SIGINT, 128 + signal.SIGINT)
    assert "stopped: interrupted (KeyboardInterrupt)" in out.read_text()


def test_asynchronous_frontends_that_start_late_do_not_miss_the_run(processes, tmp_path):
    launcher = start_launcher(processes, tmp_path, 4, "--asynchronous", "--count", "1", "--max_version", "6",
                              "--late_rank", "3", "--late", "3")
    assert exit_within(launcher, STARTUP + 30) == 0
    backend = log(tmp_path, 0).read_text()
    assert "asynchronous start: 3 frontends ready (min_frontends=3); serving version 0" in backend
    assert backend.index("rank 3 (rank3) joined") < backend.index("asynchronous start: 3 frontends ready")
    assert re.search(r"accepted the upload of openfl_api/rank3: trained from version 0,", backend), backend


def test_a_backend_that_goes_away_leaves_one_line_per_frontend_and_no_cpp_stack(processes, tmp_path):
    launcher = start_launcher(processes, tmp_path, 3, "--count", "2", "--max_version", "1000", "--reconnect", "2",
                              grace=20)
    wait_for_line(log(tmp_path, 0), r"version 2: aggregated", STARTUP, launcher)
    backend_pid = int(wait_for_line(tmp_path / "launcher.log", r"", 1.0) and _pid_of_rank(launcher.pid, 0))
    import os
    os.kill(backend_pid, signal.SIGKILL)
    exit_within(launcher, 60)
    for rank in (1, 2):
        text = log(tmp_path, rank).read_text()
        assert "frame #" not in text and "recvValue failed" not in text, text[-3000:]
        assert re.search(r"federation over: lost the backend at tcp://\S+ and could not reach it again within "
                         r"reconnect=0:00:02", text), text[-3000:]


def _pid_of_rank(launcher_pid: int, rank: int) -> Optional[int]:
    """The pid of the child of the launcher whose environment has RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().split()
            if int(stat[3]) != launcher_pid:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under the launcher {launcher_pid}")
