"""A user-space link between two interfaces, for the multi-host tests: delay, loss and cuts.

This kernel has no ``netem`` qdisc, so a host whose link must be slow, lossy or cut sits behind a
middle namespace that runs this forwarder: every Ethernet frame that arrives on one interface is
sent out of the other (an L2 bridge in user space, over ``AF_PACKET`` sockets), after ``delay``
seconds and unless it is lost (probability ``loss``, from a seeded generator). Both directions are
treated alike, as if both ends of the cable had the same ``netem``. A cut drops every frame, which
is what a pulled cable looks like to TCP: no reset, only silence.

The settings live in a JSON control file, ``{"delay": 0.05, "loss": 0.01, "cut": false}``, that the
forwarder reads again whenever it changes, so a test changes the link while the run goes on.

``python forwarder.py offloads-off IFACE ...`` turns off the checksum and segmentation offloads of
interfaces (run it in their namespace): a frame copied in user space must carry its real checksum
and be no larger than the MTU. ``python forwarder.py run --a IFACE --b IFACE --control FILE`` forwards.
Only the standard library is used, so it starts in well under a second.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from typing import Deque, Dict, List, Tuple

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
SIOCETHTOOL = 0x8946
# Legacy ethtool "set" commands: tx checksum, scatter-gather, TSO, GSO, GRO.
_OFFLOADS = {"tx-checksum": 0x17, "scatter-gather": 0x19, "tso": 0x1F, "gso": 0x24, "gro": 0x2C}


def offloads_off(interface: str) -> None:
    """Turn off the offloads that would hand a user-space copy frames with no checksum or over the MTU."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name, command in _OFFLOADS.items():
            value = ctypes.create_string_buffer(struct.pack("II", command, 0))
            request = struct.pack("16sP", interface.encode(), ctypes.addressof(value)) + bytes(16)
            try:
                fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)
            except OSError as exc:  # an offload the driver does not have is already off
                if name in ("tx-checksum", "tso"):
                    raise OSError(f"cannot turn off {name} on {interface}: {exc}") from None


def _open(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, ETH_P_ALL))
    index = socket.if_nametoindex(interface)
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, bytes(8)))
    sock.setblocking(False)
    return sock


class _Control:
    """The link's settings, read again from the control file when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.delay, self.loss, self.cut = 0.0, 0.0, False
        self._stamp = None
        self.read()

    def read(self) -> None:
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self.path) as stream:
                settings = json.load(stream)
        except (OSError, ValueError):
            return  # half written: read it next time
        self.delay = float(settings.get("delay", 0.0))
        self.loss = float(settings.get("loss", 0.0))
        self.cut = bool(settings.get("cut", False))


def run(a: str, b: str, control_path: str, seed: int) -> None:
    """Forward frames between interfaces ``a`` and ``b`` until SIGTERM."""
    control = _Control(control_path)
    chance = random.Random(seed)
    sockets = {a: _open(a), b: _open(b)}
    other = {a: b, b: a}
    queues: Dict[str, Deque[Tuple[float, bytes]]] = {a: collections.deque(), b: collections.deque()}
    counts = collections.Counter()
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    next_read = 0.0
    by_fd = {sock.fileno(): name for name, sock in sockets.items()}
    while running[0]:
        now = time.monotonic()
        if now >= next_read:
            control.read()
            next_read = now + 0.05
        due = min((q[0][0] for q in queues.values() if q), default=now + 0.05)
        ready, _, _ = select.select(list(by_fd), [], [], max(0.0, min(due - now, next_read - now)))
        for fd in ready:
            source = by_fd[fd]
            while True:
                try:
                    frame, address = sockets[source].recvfrom(65536)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue  # our own copy of a frame we sent out of this interface
                counts["in"] += 1
                if control.cut or (control.loss and chance.random() < control.loss):
                    counts["dropped"] += 1
                    continue
                queues[other[source]].append((time.monotonic() + control.delay, frame))
        now = time.monotonic()
        for target, queue in queues.items():
            while queue and queue[0][0] <= now:
                _, frame = queue.popleft()
                if control.cut:
                    counts["dropped"] += 1
                    continue
                try:
                    sockets[target].send(frame)
                    counts["out"] += 1
                except OSError as exc:
                    counts["failed"] += 1
                    if counts["failed"] <= 5:
                        print(f"forwarder: cannot send a {len(frame)}-byte frame on {target}: {exc}", file=sys.stderr,
                              flush=True)
    print(f"forwarder: {dict(counts)}", file=sys.stderr, flush=True)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    off = commands.add_parser("offloads-off")
    off.add_argument("interfaces", nargs="+")
    forward = commands.add_parser("run")
    forward.add_argument("--a", required=True)
    forward.add_argument("--b", required=True)
    forward.add_argument("--control", required=True)
    forward.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "offloads-off":
        for interface in args.interfaces:
            offloads_off(interface)
    else:
        run(args.a, args.b, args.control, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
