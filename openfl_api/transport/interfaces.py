"""Which network interface a pipe binds to, and whether an address belongs to this machine.

A gloo pipe binds a socket on each side and tells the other side where to connect. Gloo's default
device binds to whatever the machine's host name resolves to, which on a stock Debian or Ubuntu
install is a loopback address (``127.0.1.1`` in ``/etc/hosts``): the peer on another machine then
gets "connection refused". So openfl_api picks the address itself:

- ``GLOO_SOCKET_IFNAME`` set: that interface (the first of a comma-separated list), as torch's own
  process groups do;
- a loopback address (``tcp://127.0.0.1:...``): ``127.0.0.1`` on both sides;
- otherwise the address of the interface that routes to the backend's host: the backend's own
  address on the backend, and on a frontend the source address the kernel picks to reach it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Optional

from openfl_api.errors import AddressError

__all__ = ["Binding", "binding", "is_loopback", "check_local", "IFNAME_VAR"]

IFNAME_VAR = "GLOO_SOCKET_IFNAME"
_ANY_ROUTE = "192.0.2.1"  # TEST-NET-1: only used to ask the kernel for the default route's source address


def is_loopback(host: Optional[str]) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _source_address(target: str) -> Optional[str]:
    """The local address the kernel would send from to reach ``target`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(target), 9))
            return probe.getsockname()[0]
    except OSError:
        return None


class Binding:
    """Where this side of a pipe binds: ``interface`` (a name) or ``hostname`` (an address).

    Attributes:
        interface: a network interface name, or None.
        hostname: an address to bind, or None.
        why: how it was chosen, for messages.
    """

    def __init__(self, interface: Optional[str] = None, hostname: Optional[str] = None, why: str = "") -> None:
        self.interface, self.hostname, self.why = interface, hostname, why

    def __str__(self) -> str:
        return f"interface {self.interface}" if self.interface else f"{self.hostname} ({self.why})"


def binding(host: Optional[str], backend: bool) -> Binding:
    """Where a pipe to (or, on the backend, of) the address at ``host`` binds on this machine.

    ``host`` is None for a ``file://`` address: the interface of the default route is used then.
    """
    ifname = os.environ.get(IFNAME_VAR, "").split(",")[0].strip()
    if ifname:
        return Binding(interface=ifname, why=f"{IFNAME_VAR}={ifname}")
    if is_loopback(host):
        return Binding(hostname="127.0.0.1", why="the address is loopback")
    if host is not None and backend:
        try:
            return Binding(hostname=socket.gethostbyname(host), why="the backend's own address")
        except OSError:
            pass
    source = _source_address(host if host is not None else _ANY_ROUTE)
    if source is not None:
        why = f"the interface that routes to {host}" if host is not None else "the interface of the default route"
        return Binding(hostname=source, why=why)
    return Binding(hostname=socket.gethostname(), why="the host name (no route found)")


def check_local(host: str, port: int) -> None:
    """Raise AddressError unless ``host`` is an address of this machine the backend can listen on.

    The backend hosts its address's store: an address of another machine (an address file copied
    from elsewhere, a wrong ``--master_addr``) would fail deep inside torch, or worse, be reached
    by nobody.
    """
    if host in ("", "0.0.0.0", "::") or is_loopback(host):
        return
    try:
        resolved = socket.gethostbyname(host)
    except OSError as exc:
        raise AddressError(f"tcp://{host}:{port}: the host name {host!r} does not resolve here ({exc.strerror}); "
                           "give the backend an address of this machine") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((resolved, 0))
        except OSError:
            raise AddressError(
                f"tcp://{host}:{port} is not an address of this machine ({host} is {resolved}, which no interface "
                "here has): the backend hosts the store of its own address. Run the backend on that machine, or "
                "give it an address of this one (ip -brief address lists them)"
            ) from None
