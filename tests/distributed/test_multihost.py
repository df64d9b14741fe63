"""Several machines, made of network namespaces whose host name resolves to loopback (as on a
stock Debian/Ubuntu install): the launcher on each, the pipes across the bridge.

Every process is started with ``ip netns exec`` in its own session and killed with its group in a
``finally``; every wait has a deadline; the namespaces are removed after each test.
"""

from __future__ import annotations

import re
import sys

import pytest

import netns
from test_federation import DEADLINE, ROOT, Processes

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root and ip(8) to build network namespaces")
PORT = "29500"
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


def launcher(processes, hosts, index, tmp_path, nnodes, counts, *script_args):
    args = hosts.command(index, sys.executable, "-m", "openfl_api.launch", "--nnodes", str(nnodes), "--node_rank",
                         str(index), "--nproc_per_node", counts, "--master_addr", hosts.addresses[0],
                         "--master_port", PORT, "--logdir", str(tmp_path / f"node{index}"), "--grace", "5",
                         str(ROOT / "demo.py"), *script_args)
    return processes.start(args, log=tmp_path / f"launcher{index}.log", OPENFL_API_TOKEN=TOKEN)


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
