"""Secure aggregation with real processes through the launcher, and as threads under simulate."""

from __future__ import annotations

import sys
from pathlib import Path

from test_federation import DEADLINE, launch, log_of, processes  # noqa: F401 (processes: a fixture)

SCRIPT = Path(__file__).with_name("scripts") / "secagg.py"


def test_secure_aggregation_through_the_launcher_gives_fedavg_within_the_step(processes, tmp_path: Path) -> None:
    result = launch(processes, tmp_path, 4, SCRIPT)
    backend = log_of(tmp_path, 0)
    assert result.returncode == 0, result.stdout + backend
    assert "SECAGG OK version 2" in backend
    assert "secure aggregation round 0: 3 members" in backend
    assert "secure aggregation round 1: 3 members" in backend


def test_a_round_failed_by_a_tampered_share_is_discarded_and_the_federation_goes_on(processes, tmp_path: Path) -> None:
    result = launch(processes, tmp_path, 4, SCRIPT, "--tamper", "2")
    backend = log_of(tmp_path, 0)
    assert result.returncode == 0, result.stdout + backend
    assert "secure aggregation round 0 failed" in backend and "Culprits: ['openfl_api/rank2']" in backend, backend
    assert "the federation goes on with round 0.1" in backend
    assert "SECAGG OK version 2" in backend  # the model of the run without the tampered round


def test_secure_aggregation_with_clip_and_noise_under_simulate(processes, tmp_path: Path) -> None:
    process = processes.start([sys.executable, "-m", "openfl_api.simulate", "--nproc_per_node", "4", str(SCRIPT),
                               "--dp"])
    stdout, _ = process.communicate(timeout=DEADLINE)
    assert process.returncode == 0, stdout
    assert "SECAGG OK version 2" in stdout
