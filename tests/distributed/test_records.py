"""Records of real runs: a launched run and a simulated run of one seed hold the same metrics per
version; a backend SIGKILLed and resumed leaves one valid record without duplicate versions or
evaluations, holding the metrics of an uninterrupted run; the README's demo draws its progress
line on the launcher's terminal and its record plots.

Every process runs in its own session and is killed with its group in a ``finally``; every wait
has a deadline.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from test_docs_log_lines import readme_demo
from test_federation import DEADLINE, ROOT, Processes, child_env, free_port

EXAMPLE = ROOT / "examples" / "digits_evaluation.py"
SCRIPT = Path(__file__).with_name("scripts") / "records.py"


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


def entries(path: Path) -> List[dict]:
    """Every line of a record, each parsed (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_per_version(path: Path) -> Dict[Tuple[str, int], dict]:
    """``(kind, version)`` -> what the record says of the version's metrics; ``kind`` is
    ``"train"`` for the aggregated versions."""
    found = {}
    for entry in entries(path):
        if entry["event"] == "version":
            found[("train", entry["version"])] = {k: entry[k] for k in ("metrics", "participants", "num_samples")}
        elif entry["event"] == "evaluation":
            found[(entry["kind"], entry["version"])] = {k: entry[k] for k in ("metrics", "clients", "num_samples")}
    return found


def test_a_launched_run_and_a_simulated_run_of_one_seed_record_the_same_metrics_per_version(processes, tmp_path):
    pytest.importorskip("sklearn")
    common = [str(EXAMPLE), "--rounds", "3", "--seed", "3"]
    launched = processes.start([sys.executable, "-m", "openfl_api.launch", "--nproc_per_node", "3", "--record",
                                str(tmp_path / "launched.jsonl"), "--logdir", str(tmp_path / "logs"), *common],
                               log=tmp_path / "launched.log")
    simulated = processes.start([sys.executable, "-m", "openfl_api.simulate", "--record",
                                 str(tmp_path / "simulated.jsonl"), *common], log=tmp_path / "simulated.log")
    assert simulated.wait(timeout=DEADLINE) == 0, (tmp_path / "simulated.log").read_text()[-3000:]
    assert launched.wait(timeout=DEADLINE) == 0, (tmp_path / "logs" / "rank_0.log").read_text()[-3000:]
    one, other = metrics_per_version(tmp_path / "launched.jsonl"), metrics_per_version(tmp_path / "simulated.jsonl")
    assert sorted(one) == sorted(other) == sorted(
        [("train", v) for v in (1, 2, 3)] + [(k, v) for k in ("federated", "centralized") for v in (0, 1, 2, 3)])
    for key in one:
        assert one[key] == other[key], key
    assert one[("federated", 3)]["clients"] == 10


def start(processes, folder: Path, port: int, rank: int, *extra: str, name: str = ""):
    args = [sys.executable, str(SCRIPT), "--init_method", f"tcp://127.0.0.1:{port}", "--world_size", "3",
            "--rank", str(rank), *extra]
    return processes.start(args, log=folder / f"{name or f'rank{rank}'}.log", OPENFL_API_TOKEN="t",
                           OMP_NUM_THREADS="1")


def test_a_backend_killed_and_resumed_leaves_one_valid_record_without_duplicate_versions(processes, tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir()
    reference.mkdir()
    ranks = []
    for folder, extra in ((killed, ("--kill_backend_at", "3=1")), (reference, ())):
        port = free_port()
        run = ("--checkpoint", str(folder / "ckpt"), "--record", str(folder / "run.jsonl"))
        ranks.append([start(processes, folder, port, 0, *run, *extra, name="backend")]
                     + [start(processes, folder, port, rank, *run) for rank in (1, 2)])
    assert ranks[0][0].wait(timeout=DEADLINE) == -signal.SIGKILL
    cut = (killed / "run.jsonl").read_text()
    port = int(ranks[0][1].args[ranks[0][1].args.index("--init_method") + 1].rsplit(":", 1)[1])
    resumed = start(processes, killed, port, 0, "--checkpoint", str(killed / "ckpt"), "--record",
                    str(killed / "run.jsonl"), "--resume", str(killed / "ckpt"), name="resumed")
    for process, log in [(resumed, killed / "resumed.log"), *[(p, reference / "backend.log") for p in ranks[1][:1]],
                         *[(p, killed / f"rank{r}.log") for r, p in zip((1, 2), ranks[0][1:])],
                         *[(p, reference / f"rank{r}.log") for r, p in zip((1, 2), ranks[1][1:])]]:
        assert process.wait(timeout=DEADLINE) == 0, log.read_text()[-3000:]
    assert "resumed from" in (killed / "resumed.log").read_text()
    record = entries(killed / "run.jsonl")  # every line is JSON
    events = [e["event"] for e in record]
    assert events.count("run") == 1 and events.count("resume") == 1 and events.count("end") == 1
    assert [e["version"] for e in record if e["event"] == "version"] == [1, 2, 3, 4, 5]
    assert record[events.index("resume")]["version"] == 3
    assert (killed / "run.jsonl").read_text().startswith(cut[:cut.index('"event":"version","time"')])
    evaluated = [(e["kind"], e["version"]) for e in record if e["event"] == "evaluation"]
    assert sorted(evaluated) == sorted(set(evaluated)) == [("federated", v) for v in range(6)]
    # The reports of version 3 that the killed backend acknowledged are sent again to the resumed one.
    assert metrics_per_version(killed / "run.jsonl") == metrics_per_version(reference / "run.jsonl")


def read_terminal(master: int, process: subprocess.Popen, deadline: float) -> str:
    """What the processes wrote to a pseudo-terminal, until every writer closed it."""
    chunks = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_the_readme_demo_draws_the_progress_line_on_the_launchers_terminal_and_its_record_plots(tmp_path):
    shutil.copy(ROOT / "demo.py", tmp_path / "demo.py")
    args = readme_demo()
    assert "--record" in args
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    process = subprocess.Popen([sys.executable, "-m", "openfl_api.launch", *args], cwd=tmp_path, env=child_env(),
                               stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    try:
        output = read_terminal(master, process, time.monotonic() + DEADLINE)
        assert process.wait(timeout=30) == 0, output[-3000:]
    finally:
        os.close(master)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    lines = output.replace("\r", "\n").splitlines()
    bars = [line for line in lines if line.startswith("version: 100%|")]
    assert bars and "| 3/3 [" in bars[-1] and " versions/s, loss " in bars[-1], output[-2000:]
    assert "version:" not in (tmp_path / "logs" / "rank_0.log").read_text()  # the log stays free of redraws
    record = tmp_path / args[args.index("--record") + 1]
    assert [e["version"] for e in entries(record) if e["event"] == "version"] == [1, 2, 3]
    done = subprocess.run([sys.executable, "-m", "openfl_api.plot", str(record)], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"[openfl_api.plot] wrote {record.with_suffix('.png')} (1 metric of 1 record)\n"
