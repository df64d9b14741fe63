"""Several machines, made of network namespaces whose host name resolves to loopback (as on a
stock Debian/Ubuntu install): the launcher on each, the pipes across the bridge.

Every process is started with ``ip netns exec`` in its own session and killed with its group in a
``finally``; every wait has a deadline; the namespaces are removed after each test.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

import netns
from test_federation import DEADLINE, ROOT, SCRIPT, Processes

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root and ip(8) to build network namespaces")
PORT = "29500"
TOKEN = "0123456789abcdef0123456789abcdef"
#: How long the partition test cuts a link: 60 s, a pulled cable, longer than TCP's first
#: retransmissions back off. OPENFL_TEST_CUT_S=8 gives a quick local run: detection depends only on
#: the heartbeat and the link timeout, and each attempt to join again opens fresh connections.
CUT = float(os.environ.get("OPENFL_TEST_CUT_S", "60"))


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


def launcher(processes, hosts, index, tmp_path, nnodes, counts, *script_args, script=ROOT / "demo.py"):
    args = hosts.command(index, sys.executable, "-m", "openfl_api.launch", "--nnodes", str(nnodes), "--node_rank",
                         str(index), "--nproc_per_node", counts, "--master_addr", hosts.addresses[0],
                         "--master_port", PORT, "--logdir", str(tmp_path / f"node{index}"), "--grace", "5",
                         str(script), *script_args)
    return processes.start(args, log=tmp_path / f"launcher{index}.log", OPENFL_API_TOKEN=TOKEN)


def rank_log(tmp_path: Path, node: int, rank: int) -> Path:
    return tmp_path / f"node{node}" / f"rank_{rank}.log"


def wait_for_line(path: Path, pattern: str, nodes, after: int = 0, deadline: float = DEADLINE) -> datetime:
    """Wait until a line after the first ``after`` characters of the log ``path`` matches
    ``pattern``; return the time the line was logged."""
    end = time.monotonic() + deadline
    while True:
        text = path.read_text() if path.exists() else ""
        match = re.search(rf"^(\S+ \S+) \|.*{pattern}", text[after:], re.MULTILINE)
        if match:
            return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f")
        assert time.monotonic() < end, f"no line matching {pattern!r} in {path} within {deadline} s:\n{text[-3000:]}"
        assert all(node.poll() is None for node in nodes), f"a launcher ended early:\n{text[-3000:]}"
        time.sleep(0.05)  # polling a log file another process writes, with a deadline


def test_a_federation_over_three_hosts_whose_names_resolve_to_loopback_finishes(processes, tmp_path):
    with netns.hosts(3) as hosts:
        nodes = [launcher(processes, hosts, i, tmp_path, 3, "1") for i in range(3)]
        for i, node in enumerate(nodes):
            assert node.wait(timeout=DEADLINE) == 0, (tmp_path / f"launcher{i}.log").read_text()[-3000:]
    backend = (tmp_path / "node0" / "rank_0.log").read_text()
    assert "version 3: aggregated 2 uploads" in backend
    for rank in (1, 2):
        frontend = (tmp_path / f"node{rank}" / f"rank_{rank}.log").read_text()
        assert f"joined backend at tcp://{hosts.addresses[0]}:{PORT} as rank {rank}" in frontend
        assert "finished at version 3" in frontend


def test_a_backend_only_node_and_a_node_of_two_frontends(processes, tmp_path):
    with netns.hosts(2) as hosts:
        nodes = [launcher(processes, hosts, i, tmp_path, 2, "1,2") for i in range(2)]
        for i, node in enumerate(nodes):
            assert node.wait(timeout=DEADLINE) == 0, (tmp_path / f"launcher{i}.log").read_text()[-3000:]
    assert "starting ranks 1..2 of world_size 3" in (tmp_path / "launcher1.log").read_text()
    assert "version 3: aggregated 2 uploads" in (tmp_path / "node0" / "rank_0.log").read_text()


def test_a_backend_refuses_to_host_an_address_of_another_machine(processes, tmp_path):
    with netns.hosts(2) as hosts:
        # The backend's node runs on the second host but is told the first host's address.
        args = hosts.command(1, sys.executable, str(ROOT / "demo.py"), "--rank", "0", "--world_size", "2",
                             "--init_method", f"tcp://{hosts.addresses[0]}:{PORT}")
        backend = processes.start(args, log=tmp_path / "backend.log", OPENFL_API_TOKEN=TOKEN)
        assert backend.wait(timeout=DEADLINE) != 0
    text = (tmp_path / "backend.log").read_text()
    assert re.search(rf"AddressError: tcp://{re.escape(hosts.addresses[0])}:{PORT} is not an address of this machine "
                     r"\(.* which no interface here has\): the backend hosts the store of its own address", text), text


def test_a_cut_link_is_named_at_both_ends_within_5_s_and_the_host_rejoins_without_losing_an_update(
        processes, tmp_path):
    stop, result = tmp_path / "stop", tmp_path / "result"
    args = ("--count", "1", "--max_version", "1000", "--pace", "0.3", "--stop_file", str(stop),
            "--result", str(result))
    with netns.hosts(3, behind=[2]) as hosts:
        nodes = [launcher(processes, hosts, i, tmp_path, 3, "1", *args, script=SCRIPT) for i in range(3)]
        backend, cut_off = rank_log(tmp_path, 0, 0), rank_log(tmp_path, 2, 2)
        wait_for_line(backend, "version 3: aggregated", nodes)
        before = len(backend.read_text()), len(cut_off.read_text())
        cut_at = datetime.now()
        hosts.link(2, cut=True)
        seen_backend = wait_for_line(backend, r"rank 2 \(\S+\) left: pipe failed", nodes, after=before[0])
        seen_frontend = wait_for_line(cut_off, "lost the link to backend", nodes, after=before[1])
        time.sleep(max(0.0, CUT - (datetime.now() - cut_at).total_seconds()))  # the cut lasts CUT seconds
        hosts.link(2)
        rejoined = wait_for_line(backend, r"rank 2 \(\S+\) joined", nodes, after=before[0])
        wait_for_line(cut_off, "joined backend", nodes, after=before[1])
        stop.touch()
        for i, node in enumerate(nodes):
            assert node.wait(timeout=DEADLINE) == 0, (tmp_path / f"launcher{i}.log").read_text()[-3000:]
    assert (seen_backend - cut_at).total_seconds() < 5, f"the backend named the cut {seen_backend - cut_at} after it"
    assert (seen_frontend - cut_at).total_seconds() < 5, f"the frontend named the cut {seen_frontend - cut_at} after it"
    assert rejoined > cut_at
    final = json.loads(Path(f"{result}.0").read_text())
    # Each accepted upload made one version (count=1): none was accepted and then lost.
    assert final["accepted"] == final["version"]
    told = sum(json.loads(Path(f"{result}.{rank}").read_text())["accepted"] for rank in (1, 2))
    assert final["version"] - 1 <= told <= final["version"]  # at most the ACK that the cut swallowed


def test_a_federation_with_50_ms_of_delay_and_1_percent_loss_on_one_host_finishes(processes, tmp_path):
    with netns.hosts(3, behind=[2]) as hosts:
        hosts.link(2, delay=0.05, loss=0.01)
        nodes = [launcher(processes, hosts, i, tmp_path, 3, "1") for i in range(3)]
        for i, node in enumerate(nodes):
            assert node.wait(timeout=DEADLINE) == 0, (tmp_path / f"launcher{i}.log").read_text()[-3000:]
    assert "version 3: aggregated 2 uploads" in rank_log(tmp_path, 0, 0).read_text()
    assert "finished at version 3" in rank_log(tmp_path, 2, 2).read_text()


def test_an_address_file_entry_changed_while_running_keeps_the_federation_going(processes, tmp_path):
    import openfl_api as ofl

    address_file = tmp_path / "federation.json"
    with netns.hosts(3) as hosts:
        entry = ofl.Address(init_method=f"tcp://{hosts.addresses[0]}:{PORT}", world_size=3, rank=0)
        ofl.dump_address_file(address_file, [entry])
        stop, mark = tmp_path / "stop", tmp_path / "mark"
        args = ("--count", "2", "--max_version", "1000", "--pace", "0.3", "--stop_file", str(stop))
        nodes = [launcher(processes, hosts, 0, tmp_path, 3, "1", *args, "--address_file", str(address_file),
                          script=SCRIPT)]
        nodes += [launcher(processes, hosts, i, tmp_path, 3, "1", *args, script=SCRIPT) for i in (1, 2)]
        backend = rank_log(tmp_path, 0, 0)
        wait_for_line(backend, "version 2: aggregated", nodes)
        ofl.dump_address_file(address_file, [entry.replace(world_size=4)])
        wait_for_line(backend, "changed .* world_size 3 -> 4", nodes)
        late = processes.start(hosts.command(2, sys.executable, str(SCRIPT), "--rank", "3", "--world_size", "4",
                                             "--init_method", entry.init_method, "--mark", str(mark), *args),
                               log=tmp_path / "late.log", OPENFL_API_TOKEN=TOKEN)
        joined = wait_for_line(backend, r"rank 3 \(rank3\) joined", nodes)
        deadline = time.monotonic() + DEADLINE
        while not mark.exists():  # the late frontend had an upload accepted
            assert time.monotonic() < deadline and late.poll() is None, (tmp_path / "late.log").read_text()[-3000:]
            time.sleep(0.05)
        stop.touch()
        for i, node in enumerate(nodes):
            assert node.wait(timeout=DEADLINE) == 0, (tmp_path / f"launcher{i}.log").read_text()[-3000:]
        assert late.wait(timeout=DEADLINE) == 0, (tmp_path / "late.log").read_text()[-3000:]
    assert joined
    for rank in (1, 2):
        frontend = rank_log(tmp_path, rank, rank).read_text()
        assert "says: this address's entry changed in the address file; join again; joining again" in frontend
        assert frontend.count(f"as rank {rank}") == 2, frontend[-3000:]


def test_a_two_level_federation_over_three_hosts_gives_the_flat_federations_weights(processes, tmp_path):
    """Root alone on h0; an edge and its two leaves on each of h1 and h2 (ranks 1-3 and 4-6)."""
    import subprocess

    import torch

    topology = tmp_path / "topology.json"
    with netns.hosts(3) as hosts:
        topology.write_text(json.dumps({"parents": {"1": 0, "2": 1, "3": 1, "4": 0, "5": 4, "6": 4},
                                        "hosts": {"1": hosts.addresses[1], "4": hosts.addresses[2]}}))
        args = ("--topology", str(topology), "--out", str(tmp_path / "tree.pt"))
        nodes = [launcher(processes, hosts, i, tmp_path, 3, "1,3,3", *args, script=ROOT / "examples" / "hierarchy.py")
                 for i in range(3)]
        for i, node in enumerate(nodes):
            assert node.wait(timeout=DEADLINE) == 0, (tmp_path / f"launcher{i}.log").read_text()[-3000:]
    assert f"joined backend at tcp://{hosts.addresses[1]}:{int(PORT) + 1} as rank 2" in rank_log(tmp_path, 1, 3).read_text()
    assert "serving the parent's version 2" in rank_log(tmp_path, 2, 4).read_text()
    flat = subprocess.run([sys.executable, "-m", "openfl_api.simulate", "--nproc_per_node", "5", "--timeout", "100",
                           str(ROOT / "examples" / "hierarchy.py"), "--fanout", "4", "--out", str(tmp_path / "flat.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert flat.returncode == 0, flat.stdout[-3000:] + flat.stderr[-3000:]
    tree, flat = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("tree", "flat"))
    assert list(tree) == list(flat) and all(torch.equal(tree[k], flat[k]) for k in tree)
