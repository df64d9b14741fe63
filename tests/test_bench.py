"""Smoke tests of the benchmarks: each runs end to end on a tiny setting and prints its table.

They check that the scripts work (children start, the lockstep protocol completes, the report
prints), never a speed: the figures live in the benchmarks' own output, not in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_the_simulation_bench_runs_its_three_modes_in_lockstep_and_prints_its_table():
    out = run("simulation.py", "--repeats", "1", "--rounds", "3", "--config", "20:0.5")
    assert "| 20 | 0.5 | 10 |" in out


def test_the_transfer_bench_runs_its_three_phases_in_lockstep_and_prints_the_ratios():
    out = run("transfer.py", "--repeats", "1", "--rounds", "2")
    assert "ratio API / raw" in out and "ratio floor / raw" in out


def test_the_transforms_bench_times_each_transform_and_secure_aggregations_round():
    out = run("transforms.py", "--repeats", "1", "--rounds", "2", "--models", "mlp")
    assert "| QSGD 8 bits |" in out and "ratio SecAgg / plain" in out
