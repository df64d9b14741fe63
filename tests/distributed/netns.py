"""Hosts made of network namespaces on a bridge, for the multi-host tests (root only).

Each host gets an address 10.<net>.0.<n+1>/24 on one bridge, a loopback, and its own /etc/hosts
(``ip netns exec`` bind-mounts /etc/netns/<name>/hosts) in which this machine's host name
resolves to 127.0.1.1, as on a stock Debian or Ubuntu install: the trap a multi-host run must
survive. Names are unique per test run, and everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator, List


def available() -> bool:
    """Whether this process may create network namespaces (root, with ``ip``)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Hosts:
    """``count`` namespaces on a bridge; ``command(i, ...)`` runs a command inside host ``i``."""

    def __init__(self, count: int) -> None:
        self.tag = secrets.token_hex(3)
        self.net = 10 + int(self.tag, 16) % 200
        self.names = [f"ofl{self.tag}h{i}" for i in range(count)]
        self.addresses = [f"10.{self.net}.0.{i + 1}" for i in range(count)]
        self.bridge = f"ofl{self.tag}br"

    def up(self) -> "Hosts":
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i, (name, address) in enumerate(zip(self.names, self.addresses)):
            inside, outside = f"ofl{self.tag}v{i}", f"ofl{self.tag}b{i}"
            _ip("netns", "add", name)
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", name)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("netns", "exec", name, "ip", "addr", "add", f"{address}/24", "dev", inside)
            _ip("netns", "exec", name, "ip", "link", "set", inside, "up")
            _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
            folder = Path("/etc/netns") / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
        return self

    def command(self, index: int, *args: str) -> List[str]:
        return ["ip", "netns", "exec", self.names[index], *args]

    def down(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "pids", name], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@contextlib.contextmanager
def hosts(count: int) -> Iterator[Hosts]:
    made = Hosts(count)
    try:
        yield made.up()
    finally:
        made.down()
