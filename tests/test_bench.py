"""Smoke tests of the benchmarks: each runs end to end on a tiny setting and prints its table.

They check that the scripts work (children start, the lockstep protocol completes, the report
prints), never a speed: the figures live in the benchmarks' own output, not in tests.
"""

from __future__ import annotations

import argparse
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


def test_the_transfer_bench_runs_its_phases_in_lockstep_and_prints_the_ratios():
    out = run("transfer.py", "--repeats", "1", "--rounds", "2")
    assert "ratio API / raw" in out and "ratio floor / raw" in out and "ratio round / raw" in out


def test_the_transforms_bench_times_each_transform_and_secure_aggregations_round():
    out = run("transforms.py", "--repeats", "1", "--rounds", "2", "--models", "mlp")
    assert "| QSGD 8 bits |" in out and "ratio SecAgg / plain" in out


def test_the_modes_bench_runs_plain_simulate_and_launched_frontends_in_lockstep_with_one_checksum(tmp_path):
    out = run("modes.py", "--repeats", "1", "--rounds", "3", "--config", "6:0.5", "--modes", "plain,simulate,launch2",
              "--logs", str(tmp_path))
    rows = {line.split("|")[3].strip(): line.split("|")[9].strip() for line in out.splitlines() if line.startswith("| 6 |")}
    assert set(rows) == {"plain", "simulate", "launch2"}
    assert rows["simulate"] == rows["launch2"]  # the same weights, bit for bit, in one process and in three


def test_the_modes_bench_names_a_mode_that_exits_before_its_first_round_at_once(tmp_path):
    broken = tmp_path / "checkout"
    (broken / "openfl_api").mkdir(parents=True)
    (broken / "openfl_api" / "__init__.py").write_text("raise SystemExit(3)\n")
    done = subprocess.run([sys.executable, str(BENCH / "modes.py"), "--repeats", "1", "--rounds", "3", "--config",
                           "2:1.0", "--modes", "plain", "--baseline", str(broken), "--baseline-modes", "simulate",
                           "--logs", str(tmp_path / "logs")], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert "mode simulate@base exited with code 3 before its first round" in done.stderr, done.stderr[-2000:]


def test_the_modes_bench_with_blocks_leaves_out_each_turns_first_round(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import modes
    finally:
        sys.path.remove(str(BENCH))
    options = argparse.Namespace(modes=["plain"], baseline=None, baseline_modes=[], rounds=6, block=2, seed=0,
                                 logs=str(tmp_path))
    result = modes.lockstep(options, 2, 1.0)["plain"]
    # Turns of rounds (2, 3), (4, 5), (6): round 1 and each turn's first are warm-ups.
    assert result["counted"] == [False, False, True, False, True, False]
    assert len(result["rounds"]) == len(result["cpu"]) == 6
    assert modes.steady(result, "rounds") == [result["rounds"][2], result["rounds"][4]]


def test_the_pipe_bench_times_both_phases_and_prints_the_ratios():
    out = run("pipe.py", "--repeats", "1", "--round-trips", "50")
    assert "ratio pipe / raw: CPU" in out and "  pipe |" in out and "   raw |" in out
