"""Faults over real processes and real gloo pipes (issue 3): a frontend killed or hung mid-upload,
a frontend restarted with its rank, two live frontends on one rank, and a backend killed with
SIGKILL and resumed from its checkpoint, compared bit for bit with an uninterrupted run.

The script (scripts/faults.py) trains deterministically, so each faulty run has an exact
reference: the same federation without the faulty rank, or without the fault.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from test_federation import DEADLINE, Processes, free_port, launch, log_of

SCRIPT = Path(__file__).with_name("scripts") / "faults.py"
BIG = 16_000_000  # floats: a 64 MB payload, so a fault 5 ms into the send lands mid-transfer


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


def weights(prefix: Path) -> dict:
    return torch.load(f"{prefix}.pt", weights_only=True)


def assert_same_weights(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs"


def wait_until(predicate, what: str, process=None, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if process is not None:
            assert process.poll() is None, f"process exited while waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_frontends_big(tmp_path_factory):
    """The reference: backend and ranks 1, 2 with the large model, no fault."""
    tmp = tmp_path_factory.mktemp("reference")
    group = Processes()
    try:
        result = launch(group, tmp, 3, SCRIPT, "--big", str(BIG), "--count", "2", "--max_version", "3",
                        "--result", str(tmp / "result"))
        assert result.returncode == 0, result.stdout + log_of(tmp, 0)
        return weights(tmp / "result")
    finally:
        group.reap()


def killed_rank_3_leaves_no_trace(processes, tmp_path, reference, fault: str) -> None:
    """Rank 3 of 4 dies during its first 64 MB upload (``fault``, an option of scripts/faults.py):
    the backend drops it, aggregates every version from the other two, and ends with their weights."""
    result = launch(processes, tmp_path, 4, SCRIPT, "--big", str(BIG), "--count", "2", "--max_version", "3",
                    fault, "3", "--transfer_timeout", "3", "--result", str(tmp_path / "result"))
    assert result.returncode == 0, result.stdout + log_of(tmp_path, 0)
    assert "failed ranks: 3" in result.stdout
    backend = log_of(tmp_path, 0)
    assert "rank 3 (rank3) left: pipe failed while receiving" in backend
    assert "version 3: aggregated 2 uploads" in backend
    assert_same_weights(weights(tmp_path / "result"), reference)


def test_a_frontend_sigkilled_mid_upload_of_a_large_payload_leaves_no_trace(processes, tmp_path, two_frontends_big):
    # Gloo does not report a peer that dies while a message is in flight: the backend's receive
    # fails at the transfer timeout, 3 s here, and the pipe is dropped then.
    killed_rank_3_leaves_no_trace(processes, tmp_path, two_frontends_big, "--kill_mid_upload")


def test_a_frontend_sigkilled_while_its_pipelined_upload_travels_leaves_no_part_of_it(processes, tmp_path,
                                                                                     two_frontends_big):
    # upload() returns at once; the frontend dies while the I/O thread sends the 64 MB.
    killed_rank_3_leaves_no_trace(processes, tmp_path, two_frontends_big, "--kill_after_upload")


def test_a_frontend_hung_mid_upload_is_timed_out_and_dropped(processes, tmp_path, two_frontends_big):
    result = launch(processes, tmp_path, 4, SCRIPT, "--big", str(BIG), "--count", "2", "--max_version", "3",
                    "--hang_mid_upload", "3", "--transfer_timeout", "3", "--result", str(tmp_path / "result"),
                    launcher_args=("--grace", "2"))
    assert result.returncode == 0, result.stdout + log_of(tmp_path, 0)
    backend = log_of(tmp_path, 0)
    assert "rank 3 (rank3) left: pipe failed" in backend
    assert "version 3: aggregated 2 uploads" in backend
    assert_same_weights(weights(tmp_path / "result"), two_frontends_big)


def start_rank(processes, tmp_path, port, rank, *extra, name=None, world_size=3):
    args = [sys.executable, str(SCRIPT), "--init_method", f"tcp://127.0.0.1:{port}", "--world_size",
            str(world_size), "--rank", str(rank), *extra]
    return processes.start(args, log=tmp_path / f"{name or f'rank{rank}'}.log", OPENFL_API_TOKEN="t")


def test_a_restarted_frontend_joins_again_with_its_rank_and_carries_on(processes, tmp_path):
    port = free_port()
    # Rank 1 takes 1.5 s per round, so rank 2's next download is held when it dies 0.5 s after uploading.
    common = ("--count", "2", "--max_version", "4", "--delay", "1=1.5", "--result", str(tmp_path / "result"))
    backend = start_rank(processes, tmp_path, port, 0, *common)
    steady = start_rank(processes, tmp_path, port, 1, *common)
    doomed = start_rank(processes, tmp_path, port, 2, *common, "--die_waiting", "2", name="rank2-first")
    assert doomed.wait(timeout=DEADLINE) == -signal.SIGKILL  # died while its download was held
    restarted = start_rank(processes, tmp_path, port, 2, *common)
    for process in (backend, steady, restarted):
        assert process.wait(timeout=DEADLINE) == 0, (tmp_path / "rank0.log").read_text()
    log = (tmp_path / "rank0.log").read_text()
    assert log.count("rank 2 (rank2) joined") == 2
    assert "version 4: aggregated 2 uploads" in log
    assert json.loads((tmp_path / "result.2.json").read_text())["rounds"] >= 1


def test_two_live_frontends_claiming_one_rank_get_a_clear_refusal_for_the_second(processes, tmp_path):
    port = free_port()
    common = ("--count", "1", "--max_version", "8", "--delay", "1=1.0")
    backend = start_rank(processes, tmp_path, port, 0, *common)
    first = start_rank(processes, tmp_path, port, 1, *common)
    wait_until(lambda: "rank 1 (rank1) joined" in (tmp_path / "rank0.log").read_text(), "rank 1 to join", backend)
    second = start_rank(processes, tmp_path, port, 1, *common, name="second")
    assert second.wait(timeout=DEADLINE) != 0
    text = (tmp_path / "second.log").read_text()
    assert "AdmissionError" in text and "rank 1 is already connected" in text
    assert first.wait(timeout=DEADLINE) == 0
    assert backend.wait(timeout=DEADLINE) == 0
    assert "version 8: aggregated" in (tmp_path / "rank0.log").read_text()


def test_a_backend_killed_and_resumed_gives_the_uninterrupted_final_model(processes, tmp_path):
    common = ("--count", "2", "--max_version", "6")
    reference = tmp_path / "reference"
    reference.mkdir()
    port = free_port()
    ranks = [start_rank(processes, reference, port, r, *common, "--result", str(reference / "result"))
             for r in range(3)]
    for process in ranks:
        assert process.wait(timeout=DEADLINE) == 0, (reference / "rank0.log").read_text()

    faulty = tmp_path / "faulty"
    faulty.mkdir()
    port = free_port()
    checkpoint = faulty / "ckpt"
    run = ("--checkpoint", str(checkpoint), "--result", str(faulty / "result"))
    backend = start_rank(processes, faulty, port, 0, *common, *run, "--kill_backend_at", "3", name="backend-first")
    frontends = [start_rank(processes, faulty, port, r, *common, *run) for r in (1, 2)]
    assert backend.wait(timeout=DEADLINE) == -signal.SIGKILL
    assert Path(f"{checkpoint}.3").exists() and not Path(f"{checkpoint}.4").exists()
    resumed = start_rank(processes, faulty, port, 0, *common, *run, "--resume", str(checkpoint))
    assert resumed.wait(timeout=DEADLINE) == 0, (faulty / "rank0.log").read_text()
    for process in frontends:
        assert process.wait(timeout=DEADLINE) == 0, (faulty / "rank1.log").read_text()
    log = (faulty / "rank0.log").read_text()
    assert "resumed from" in log and "version 6: aggregated 2 uploads" in log
    assert_same_weights(weights(faulty / "result"), weights(reference / "result"))
