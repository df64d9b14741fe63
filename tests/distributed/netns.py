"""Hosts made of network namespaces on a bridge, for the multi-host tests (root only).

Each host gets an address 10.<net>.0.<n+1>/24 on one bridge, a loopback, and its own /etc/hosts
(``ip netns exec`` bind-mounts /etc/netns/<name>/hosts) in which this machine's host name
resolves to 127.0.1.1, as on a stock Debian or Ubuntu install: the trap a multi-host run must
survive. Names are unique per test run, and everything is removed on exit.

A host named in ``behind`` reaches the bridge through a middle namespace that runs
``forwarder.py`` (this kernel has no ``netem``): :meth:`Hosts.link` gives its link a delay, a
loss rate, or cuts it, while the run goes on. Offloads are off on every interface, so frames
copied in user space carry real checksums.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List

FORWARDER = Path(__file__).with_name("forwarder.py")


def available() -> bool:
    """Whether this process may create network namespaces (root, with ``ip``)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _offloads_off(namespace: str, *interfaces: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, sys.executable, str(FORWARDER), "offloads-off", *interfaces],
                   check=True, capture_output=True, timeout=60)


class Hosts:
    """``count`` namespaces on a bridge; ``command(i, ...)`` runs a command inside host ``i``.

    Hosts in ``behind`` are linked to the bridge through a forwarder (see :meth:`link`).
    """

    def __init__(self, count: int, behind: Iterable[int] = ()) -> None:
        self.tag = secrets.token_hex(3)
        self.net = 10 + int(self.tag, 16) % 200
        self.names = [f"ofl{self.tag}h{i}" for i in range(count)]
        self.addresses = [f"10.{self.net}.0.{i + 1}" for i in range(count)]
        self.bridge = f"ofl{self.tag}br"
        self.behind = sorted(set(behind))
        self.middles = {i: f"ofl{self.tag}m{i}" for i in self.behind}
        self._folder = Path(tempfile.mkdtemp(prefix=f"ofl{self.tag}"))
        self._forwarders: Dict[int, subprocess.Popen] = {}

    def up(self) -> "Hosts":
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i, (name, address) in enumerate(zip(self.names, self.addresses)):
            inside, outside = f"ofl{self.tag}v{i}", f"ofl{self.tag}b{i}"
            _ip("netns", "add", name)
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", name)
            if i in self.middles:
                self._middle(i, outside)
            else:
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
            _ip("netns", "exec", name, "ip", "addr", "add", f"{address}/24", "dev", inside)
            _ip("netns", "exec", name, "ip", "link", "set", inside, "up")
            _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
            if self.behind:
                _offloads_off(name, inside)
            folder = Path("/etc/netns") / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
        for i in self.behind:
            self._start_forwarder(i)
        return self

    def _middle(self, i: int, toward_host: str) -> None:
        """Put host ``i``'s cable end into a middle namespace, and a second cable from there to the bridge."""
        middle, up, down = self.middles[i], f"ofl{self.tag}c{i}", f"ofl{self.tag}d{i}"
        _ip("netns", "add", middle)
        _ip("link", "set", toward_host, "netns", middle)
        _ip("link", "add", up, "type", "veth", "peer", "name", down)
        _ip("link", "set", up, "netns", middle)
        _ip("link", "set", down, "master", self.bridge)
        _ip("link", "set", down, "up")
        for interface in (toward_host, up):
            _ip("netns", "exec", middle, "ip", "link", "set", interface, "up")
        _offloads_off(middle, toward_host, up)

    def _start_forwarder(self, i: int) -> None:
        self.link(i)
        args = ["ip", "netns", "exec", self.middles[i], sys.executable, str(FORWARDER), "run",
                "--a", f"ofl{self.tag}b{i}", "--b", f"ofl{self.tag}c{i}", "--control", str(self._control(i)),
                "--seed", str(i)]
        log = open(self._folder / f"forwarder{i}.log", "w")
        self._forwarders[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _control(self, i: int) -> Path:
        return self._folder / f"link{i}.json"

    def link(self, i: int, delay: float = 0.0, loss: float = 0.0, cut: bool = False) -> None:
        """Set host ``i``'s link (a host in ``behind``): ``delay`` seconds each way, a ``loss`` rate
        each way, or ``cut`` (every frame dropped). Takes effect within 50 ms."""
        path = self._control(i)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"delay": delay, "loss": loss, "cut": cut}))
        os.replace(temporary, path)

    def forwarder_log(self, i: int) -> str:
        path = self._folder / f"forwarder{i}.log"
        return path.read_text() if path.exists() else ""

    def command(self, index: int, *args: str) -> List[str]:
        return ["ip", "netns", "exec", self.names[index], *args]

    def down(self) -> None:
        for process in self._forwarders.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._forwarders.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        for name in [*self.names, *self.middles.values()]:
            subprocess.run(["ip", "netns", "pids", name], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self._folder, ignore_errors=True)


@contextlib.contextmanager
def hosts(count: int, behind: Iterable[int] = ()) -> Iterator[Hosts]:
    made = Hosts(count, behind)
    try:
        yield made.up()
    finally:
        made.down()
