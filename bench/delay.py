"""Round time of a federation across three hosts, with 50 ms of one-way delay on one host's link,
as a ratio to the same federation without delay, measured in the same run (root only).

    sudo python bench/delay.py [--versions 20] [--delay 0.05] [--repeats 3]

Three network namespaces on a bridge (tests/distributed/netns.py): the backend on the first, a
frontend on each of the others; the third host's link goes through the user-space forwarder
(tests/distributed/forwarder.py), which adds ``--delay`` each way. The launcher runs
tests/distributed/scripts/federation.py on each host (synchronous, both uploads per version, a
two-parameter model, the protected wire), and the round time is the median interval between
consecutive versions in the backend's log (the first version excluded). Each repeat runs both
settings, so both see the same load; reported: each setting's median over repeats, and the ratio.

Compare figures within one run only: a shared machine's speed drifts.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

import netns  # noqa: E402

SCRIPT = ROOT / "tests" / "distributed" / "scripts" / "federation.py"
PORT = "29500"


def round_times(log: str) -> list:
    stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
              for m in re.finditer(r"^(\S+ \S+) \|.*version \d+: aggregated", log, re.MULTILINE)]
    return [(b - a).total_seconds() for a, b in zip(stamps[1:], stamps[2:])]


def run(delay: float, versions: int, folder: Path) -> float:
    """The median round time of one federation with ``delay`` on the third host's link."""
    with netns.hosts(3, behind=[2]) as hosts:
        hosts.link(2, delay=delay)
        nodes = []
        for index in range(3):
            args = hosts.command(index, sys.executable, "-m", "openfl_api.launch", "--nnodes", "3", "--node_rank",
                                 str(index), "--nproc_per_node", "1", "--master_addr", hosts.addresses[0],
                                 "--master_port", PORT, "--logdir", str(folder / f"node{index}"), str(SCRIPT),
                                 "--count", "2", "--max_version", str(versions), "--protect_wire")
            env = {"PYTHONPATH": str(ROOT), "OPENFL_API_TOKEN": "bench-delay", "PATH": "/usr/bin:/bin"}
            nodes.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        for node in nodes:
            if node.wait(timeout=600) != 0:
                raise RuntimeError(f"a launcher failed; see {folder}")
    return statistics.median(round_times((folder / "node0" / "rank_0.log").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not netns.available():
        sys.exit("needs root and ip(8) to build network namespaces")
    results = {0.0: [], args.delay: []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for delay in results:
                results[delay].append(run(delay, args.versions, Path(folder) / f"{repeat}-{delay}"))
    for delay, times in results.items():
        print(f"delay {delay * 1e3:5.0f} ms: {statistics.median(times) * 1e3:7.1f} ms per version "
              f"(repeats: {', '.join(f'{t * 1e3:.1f}' for t in times)})")
    base, slow = statistics.median(results[0.0]), statistics.median(results[args.delay])
    print(f"round time with {args.delay * 1e3:.0f} ms delay / without: {slow / base:.2f} "
          f"(+{(slow - base) * 1e3:.1f} ms per version)")


if __name__ == "__main__":
    main()
