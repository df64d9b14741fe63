"""The stores behind addresses (the control plane): opened, reached with retries, polled quietly.

``tcp://`` is a ``TCPStore`` hosted by the backend, ``file://`` a ``FileStore``, ``memory://`` a
``HashStore`` shared by the threads of one process. Every store is scoped to the address's group
name with a ``PrefixStore``.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Optional

from torch.distributed import FileStore, HashStore, PrefixStore, Store, TCPStore

from openfl_api.address import Address
from openfl_api.errors import AddressError, TransportError
from openfl_api.logger import bind
from openfl_api.transport.interfaces import check_local
from openfl_api.waiting import seconds

__all__ = ["open_store", "wait_for_key", "fresh_client"]

_memory_stores: Dict[str, HashStore] = {}
_memory_lock = threading.Lock()


def open_store(address: Address, backend: bool, timeout: timedelta, log: Any = None) -> Store:
    """Open the address's store: host it (tcp, backend), connect to it, or open the file.

    A frontend reaching a ``tcp://`` store tries again with back-off until ``timeout``, logging
    each failed attempt (a backend that is not up yet is the common case); the attempts are short,
    so Ctrl-C is never held up by more than one of them.

    Returns:
        A ``PrefixStore`` scoped to the address's group name.

    Raises:
        TransportError: the store cannot be hosted, or no backend answered within ``timeout``.
    """
    scheme = address.scheme
    try:
        if scheme == "tcp":
            if backend:
                check_local(address.host, address.port)
            base: Store = (TCPStore(address.host, address.port, None, True, timeout=timeout, wait_for_workers=False)
                           if backend else _reach_tcp_store(address, timeout, log or bind("frontend")))
        elif scheme == "file":
            path = Path(address.path)
            if not path.parent.is_dir():
                raise AddressError(f"{address}: the folder {path.parent} of the file store does not exist; create it")
            base = FileStore(str(path), -1)
        else:
            with _memory_lock:
                base = _memory_stores.setdefault(address.init_method, HashStore())
    except RuntimeError as exc:
        role = "host" if backend else "reach"
        raise TransportError(
            f"could not {role} the store of {address.init_method} within {timeout}: {str(exc).splitlines()[0]}"
        ) from exc
    return PrefixStore(f"openfl_api/{address.group_name}", base)


_ATTEMPT_S = 1.0  # the longest one connection attempt to a backend's store may block


def _reach_tcp_store(address: Address, timeout: timedelta, log: Any) -> Store:
    """Connect to the backend's TCPStore, trying again with back-off until ``timeout``.

    Each attempt first opens a plain socket (at most ``_ATTEMPT_S``): torch's client would retry
    silently inside C++ for the whole timeout, deaf to Ctrl-C, and log a C++ stack per failure.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    delay, attempt = 0.25, 0
    while True:
        attempt += 1
        try:
            with socket.create_connection((address.host, address.port), timeout=_ATTEMPT_S):
                pass
            # A backend going down can still accept the probe: then torch's connect fails too, within
            # a few seconds rather than the whole timeout; requests then get the full timeout.
            store = TCPStore(address.host, address.port, None, False, timeout=timedelta(seconds=_ATTEMPT_S * 5),
                             wait_for_workers=False)
            store.set_timeout(timeout)
            return store
        except (OSError, RuntimeError) as exc:
            left = deadline - time.monotonic()
            cause = (exc.strerror if isinstance(exc, OSError) else None) or str(exc).splitlines()[0][:120] or \
                type(exc).__name__
            if left <= 0:
                raise TransportError(
                    f"no backend at {address.init_method}: nothing answered within {timeout} ({attempt} attempts, "
                    f"last: {cause}). Start the backend (rank 0) first, check the address and port, or wait longer "
                    "with API(connect_timeout=...)"
                ) from None
            wait = min(delay, left)
            log.info(f"no backend at {address.init_method} yet ({cause}); attempt {attempt}, trying again in "
                     f"{wait:.2f}".rstrip("0").rstrip(".") + f" s, giving up in {seconds(left)}")
            time.sleep(wait)
            delay = min(delay * 2, 5.0)


def wait_for_key(store: Store, key: str, timeout: timedelta, delay: float = 0.002,
                 stop: Optional[threading.Event] = None) -> bool:
    """Wait up to ``timeout`` for ``key``; True if it exists. ``stop``: give up (False) once it is set.

    ``check`` is polled with a short back-off (from ``delay`` up to 50 ms) instead of
    ``Store.wait``: a timed-out wait makes TCPStore log a warning and holds the client's
    connection, delaying other threads' requests. Between polls the thread is in Python, so
    ``stop`` ends the wait within one back-off.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    stop = stop if stop is not None else threading.Event()
    while True:
        if store.check([key]):
            return True
        left = deadline - time.monotonic()
        if left <= 0 or stop.wait(min(delay, left)):
            return False
        delay = min(delay * 2, 0.05)


def fresh_client(address: Address, store: Store) -> Store:
    """``store``, or for ``tcp://`` a new client of the address's store (OSError when nothing answers).

    Used once a pipe broke: the old client's connection may be closed (torch logs a C++ stack
    trace for every request sent over a closed TCPStore connection), and a plain socket tells
    first, quietly, whether a live process listens (:func:`_listening`).
    """
    if address.scheme != "tcp":
        return store
    _listening(address)
    client = TCPStore(address.host, address.port, None, False, timeout=timedelta(seconds=5), wait_for_workers=False)
    return PrefixStore(f"openfl_api/{address.group_name}", client)


_HOLD_S = 0.3  # how long a probe connection must stay open to count as a live listener


def _listening(address: Address) -> None:
    """Raise OSError unless a live process listens at ``address``.

    A process being killed closes its descriptors one by one: its pipes can break while its
    listening socket still completes handshakes, and torch's client would then retry inside C++
    for its whole timeout and log a stack per failure. So the probe connection must also stay open
    for :data:`_HOLD_S` (a store server never speaks first; a listener that dies resets it).
    """
    with socket.create_connection((address.host, address.port), timeout=_ATTEMPT_S) as probe:
        probe.settimeout(_HOLD_S)
        try:
            data = probe.recv(1)
        except socket.timeout:
            return
        raise ConnectionResetError(f"the store at {address.host}:{address.port} closed the connection"
                                   + (" and spoke first" if data else ""))
