"""Which address a pipe binds to (openfl_api.transport.interfaces), and the backend's own-address check."""

from __future__ import annotations

import pytest

from openfl_api.errors import AddressError
from openfl_api.transport import interfaces


def test_gloo_socket_ifname_wins(monkeypatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7,eth8")
    chosen = interfaces.binding("10.1.2.3", backend=False)
    assert (chosen.interface, chosen.hostname) == ("eth7", None)


def test_a_loopback_address_binds_loopback_on_both_sides(monkeypatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    for backend in (True, False):
        assert interfaces.binding("127.0.0.1", backend).hostname == "127.0.0.1"
        assert interfaces.binding("localhost", backend).hostname == "127.0.0.1"


def test_a_frontend_binds_the_source_address_the_kernel_uses_to_reach_the_backend(monkeypatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(interfaces, "_source_address", lambda target: "10.9.8.7" if target == "10.0.0.1" else None)
    chosen = interfaces.binding("10.0.0.1", backend=False)
    assert chosen.hostname == "10.9.8.7" and "routes to 10.0.0.1" in chosen.why


def test_the_backend_refuses_an_address_no_interface_here_has() -> None:
    with pytest.raises(AddressError, match=r"tcp://192\.0\.2\.77:29500 is not an address of this machine"):
        interfaces.check_local("192.0.2.77", 29500)
    interfaces.check_local("127.0.0.1", 29500)
