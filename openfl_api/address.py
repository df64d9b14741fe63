"""Addresses, address files, and watching an address file while the federation runs.

An :class:`Address` says where a backend and its frontends meet: the store behind
``init_method`` (``tcp://host:port`` hosted by the backend, ``file:///path`` on a shared file
system, or ``memory://name`` inside one process), the largest ``world_size``, this process's
``rank`` and the ``group_name`` of the federation.

An address file is JSON with a schema version and a list of addresses::

    {"schema": 1,
     "addresses": [
        {"init_method": "tcp://127.0.0.1:29600", "world_size": 3, "group_name": "site-a"},
        {"init_method": "file:///tmp/site-b.store", "world_size": 5, "group_name": "site-b"}]}

A backend serves every entry; a frontend joins one. :class:`AddressFileWatcher` re-reads the file
when it changes: entries are reported as added, removed or changed (same ``init_method`` and
``group_name``, other fields), and a file that does not parse keeps the previous set (a
half-written file never closes a live address).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from openfl_api.errors import AddressError
from openfl_api.logger import bind
from openfl_api.parser import default_init_method, environ, warn_rank_zero

__all__ = ["Address", "load_address_file", "dump_address_file", "AddressFileWatcher", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
SCHEMES = ("tcp", "file", "memory")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ENTRY_FIELDS = ("backend", "init_method", "world_size", "rank", "group_name")


class Address:
    """Where a backend and its frontends meet.

    Arguments given explicitly win over ``args`` (a namespace from :mod:`openfl_api.parser`),
    which wins over the environment the launcher sets (``OPENFL_INIT_METHOD``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``OPENFL_GROUP_NAME``).

    Args:
        backend: the torch.distributed backend of the pipes; only ``"gloo"``.
        init_method: ``tcp://host:port``, ``file:///absolute/path`` or ``memory://name``.
        world_size: the backend plus the largest number of frontends; frontend ranks are
            ``1 .. world_size - 1``.
        rank: 0 for the backend, ``1 .. world_size - 1`` for a frontend.
        group_name: the federation's name on this store; several federations can share one.
        args: a parsed namespace to take unset fields from.

    Raises:
        AddressError: a field is invalid; the message names it and says what must hold.
    """

    __slots__ = ("backend", "init_method", "world_size", "rank", "group_name")

    def __init__(
        self,
        backend: Optional[str] = None,
        init_method: Optional[str] = None,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
        group_name: Optional[str] = None,
        *,
        args: Optional[argparse.Namespace] = None,
    ) -> None:
        env = environ()

        def pick(value: Any, name: str, fallback: Any) -> Any:
            if value is not None:
                return value
            if args is not None and getattr(args, name, None) is not None:
                return getattr(args, name)
            return fallback() if callable(fallback) else fallback

        self.backend = pick(backend, "backend", "gloo")
        self.init_method = pick(init_method, "init_method", default_init_method)
        self.world_size = pick(world_size, "world_size", lambda: _env_int("WORLD_SIZE", 2))
        self.rank = pick(rank, "rank", lambda: _env_int("RANK", None))
        self.group_name = pick(group_name, "group_name", lambda: env.get("OPENFL_GROUP_NAME") or "openfl_api")
        if self.rank is None:  # no rank anywhere: a process started by hand is the backend, and says so
            self.rank = 0
            if isinstance(self.world_size, int):
                warn_rank_zero(str(self.init_method), self.world_size)
        self._validate("address")

    def _validate(self, where: str) -> None:
        if self.backend != "gloo":
            raise AddressError(
                f"{where}: field 'backend' must be 'gloo', got {self.backend!r}; pipes move tensors "
                "through host memory, so gloo serves CPU and GPU models alike"
            )
        if not isinstance(self.world_size, int) or isinstance(self.world_size, bool) or self.world_size < 2:
            raise AddressError(
                f"{where}: field 'world_size' must be an integer >= 2 (the backend plus at least one "
                f"frontend), got {self.world_size!r}"
            )
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 0 <= self.rank < self.world_size:
            raise AddressError(
                f"{where}: field 'rank' must be an integer in [0, {self.world_size}) (0 is the backend), "
                f"got {self.rank!r}; raise world_size or fix the rank"
            )
        if not isinstance(self.group_name, str) or not _GROUP_NAME.match(self.group_name):
            raise AddressError(
                f"{where}: field 'group_name' must be 1-64 characters of letters, digits, '_', '.', '-', "
                f"got {self.group_name!r}"
            )
        _parse_init_method(self.init_method, where)

    @property
    def scheme(self) -> str:
        """``"tcp"``, ``"file"`` or ``"memory"``."""
        return urlsplit(self.init_method).scheme

    @property
    def host(self) -> Optional[str]:
        """The host of a ``tcp://`` address, else None."""
        return urlsplit(self.init_method).hostname if self.scheme == "tcp" else None

    @property
    def port(self) -> Optional[int]:
        """The port of a ``tcp://`` address, else None."""
        return urlsplit(self.init_method).port if self.scheme == "tcp" else None

    @property
    def path(self) -> Optional[str]:
        """The file of a ``file://`` address, else None."""
        return urlsplit(self.init_method).path if self.scheme == "file" else None

    @property
    def key(self) -> Tuple[str, str]:
        """What identifies an address in an address file: ``(init_method, group_name)``."""
        return (self.init_method, self.group_name)

    def replace(self, **changes: Any) -> "Address":
        """Return a copy with some fields changed (validated again)."""
        fields = {name: getattr(self, name) for name in _ENTRY_FIELDS}
        fields.update(changes)
        return Address(**fields)

    def to_dict(self) -> Dict[str, Any]:
        """Return the address as an address-file entry."""
        return {name: getattr(self, name) for name in _ENTRY_FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().values()))

    def __repr__(self) -> str:
        return (
            f"Address(init_method={self.init_method!r}, world_size={self.world_size}, rank={self.rank}, "
            f"group_name={self.group_name!r})"
        )


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    value = environ().get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise AddressError(f"environment variable {name} must be an integer, got {value!r}") from None


def _parse_init_method(init_method: Any, where: str) -> None:
    if not isinstance(init_method, str):
        raise AddressError(f"{where}: field 'init_method' must be a string, got {type(init_method).__name__}")
    parts = urlsplit(init_method)
    if parts.scheme not in SCHEMES:
        raise AddressError(
            f"{where}: field 'init_method' must start with tcp://, file:// or memory://, got {init_method!r}"
        )
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or not 0 < port < 65536:
            raise AddressError(
                f"{where}: field 'init_method' must look like tcp://host:port with a port in 1..65535, "
                f"got {init_method!r}"
            )
    elif parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/") or parts.path.endswith("/"):
            raise AddressError(
                f"{where}: field 'init_method' must look like file:///absolute/path/to/store, "
                f"got {init_method!r}"
            )
    elif not parts.netloc or not _GROUP_NAME.match(parts.netloc) or parts.path not in ("", "/"):
        raise AddressError(f"{where}: field 'init_method' must look like memory://name, got {init_method!r}")


def _parse_file(text: str, path: str) -> List[Address]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise AddressError(f"address file {path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or set(document) != {"schema", "addresses"}:
        raise AddressError(
            f"address file {path}: must be a JSON object with exactly the keys 'schema' and 'addresses', "
            f"got {sorted(document) if isinstance(document, dict) else type(document).__name__}"
        )
    if type(document["schema"]) is not int or document["schema"] != SCHEMA_VERSION:
        raise AddressError(f"address file {path}: schema {document['schema']!r} is not supported; use {SCHEMA_VERSION}")
    entries = document["addresses"]
    if not isinstance(entries, list):
        raise AddressError(f"address file {path}: 'addresses' must be a list, got {type(entries).__name__}")
    addresses: List[Address] = []
    seen: Dict[Tuple[str, str], int] = {}
    for index, entry in enumerate(entries):
        where = f"address file {path}: entry {index}"
        if not isinstance(entry, dict):
            raise AddressError(f"{where}: must be a JSON object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
        if unknown:
            raise AddressError(f"{where}: unknown field {unknown[0]!r}; allowed fields are {list(_ENTRY_FIELDS)}")
        for required in ("init_method", "world_size"):
            if required not in entry:
                raise AddressError(f"{where}: field {required!r} is required")
        address = Address.__new__(Address)
        address.backend = entry.get("backend", "gloo")
        address.init_method = entry["init_method"]
        address.world_size = entry["world_size"]
        address.rank = entry.get("rank", 0)
        address.group_name = entry.get("group_name", "openfl_api")
        address._validate(f"{where} (group {address.group_name!r})")
        if address.key in seen:
            raise AddressError(
                f"{where}: repeats init_method {address.init_method!r} with group_name {address.group_name!r} "
                f"of entry {seen[address.key]}; give each federation on one store its own group_name"
            )
        seen[address.key] = index
        addresses.append(address)
    return addresses


def load_address_file(path: Union[str, Path]) -> List[Address]:
    """Read and validate an address file.

    Raises:
        AddressError: the file is missing, not JSON, of another schema, or an entry is invalid;
            the message names the entry and the field.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AddressError(f"address file {path}: cannot be read ({exc.strerror})") from None
    return _parse_file(text, str(path))


def dump_address_file(path: Union[str, Path], addresses: Sequence[Address]) -> None:
    """Write ``addresses`` to ``path`` atomically (temporary file, then rename)."""
    document = {"schema": SCHEMA_VERSION, "addresses": [a.to_dict() for a in addresses]}
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=2)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class AddressFileWatcher:
    """Watches an address file and reports entries added, removed and changed while it runs.

    The file is polled (its modification time, size and inode) every ``interval``; a changed file
    is parsed and compared with the last good set. A file that fails to parse is logged and
    ignored until it changes again.

    Args:
        path: the address file.
        on_change: called as ``on_change(added, removed, changed)`` from the watcher's thread;
            ``changed`` lists ``(old, new)`` pairs of entries whose key (``init_method``,
            ``group_name``) stayed while another field changed.
        interval: how often to look at the file.
    """

    def __init__(
        self,
        path: Union[str, Path],
        on_change: Callable[[List[Address], List[Address], List[Tuple[Address, Address]]], None],
        interval: timedelta = timedelta(seconds=0.5),
        log: Any = None,
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._on_change = on_change
        self._log = log or bind("watcher")
        self._current: Dict[Tuple[str, str], Address] = {}
        self._stamp: Optional[Tuple[int, int, int]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def load(self) -> List[Address]:
        """Read the file now (errors raise) and make it the current set; returns its addresses."""
        self._stamp = self._stat()
        addresses = load_address_file(self.path)
        self._current = {a.key: a for a in addresses}
        return addresses

    def _stat(self) -> Optional[Tuple[int, int, int]]:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return (status.st_mtime_ns, status.st_size, status.st_ino)

    def poll(self) -> None:
        """Look at the file once and report what changed."""
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            addresses = load_address_file(self.path)
        except AddressError as exc:
            self._log.error(f"{exc}; keeping the {len(self._current)} addresses read before")
            return
        fresh = {a.key: a for a in addresses}
        added = [a for key, a in fresh.items() if key not in self._current]
        removed = [a for key, a in self._current.items() if key not in fresh]
        changed = [(a, fresh[key]) for key, a in self._current.items() if key in fresh and fresh[key] != a]
        self._current = fresh
        if added or removed or changed:
            self._on_change(added, removed, changed)

    def start(self) -> None:
        """Start polling in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="openfl-address-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval.total_seconds()):
            try:
                self.poll()
            except Exception as exc:  # the watcher must outlive a failing callback
                self._log.exception(f"address file watcher: {exc}")

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
