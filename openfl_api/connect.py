"""Which addresses an API connects to: the backend serves every address given (and the entries
of an address file), a frontend joins exactly one, with a rank >= 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Union

from openfl_api.address import Address, _env_int, load_address_file
from openfl_api.errors import AddressError

__all__ = ["given_addresses", "file_rank", "frontend_address", "check_backend_addresses", "warn_if_no_token"]


def given_addresses(address: Union[Address, Sequence[Address], None], address_file: Union[str, Path, None]) -> List[Address]:
    """The addresses passed to ``build_connection``, checked; at least one of the two must be given."""
    if address is None and address_file is None:
        raise AddressError("build_connection needs address=Address(...) or address_file='federation.json'")
    addresses = [address] if isinstance(address, Address) else list(address or [])
    if any(not isinstance(a, Address) for a in addresses):
        raise AddressError(f"address must be an Address or a list of them, got {address!r}")
    return addresses


def env_rank() -> int:
    """``RANK`` from the environment, 0 when unset."""
    return _env_int("RANK", 0)


def file_rank(address_file: Union[str, Path]) -> int:
    """The rank an address file gives this process: its one entry's rank when it names one (a
    frontend's file), else ``RANK`` from the environment, else 0 (the backend)."""
    entries = load_address_file(address_file)
    if len(entries) == 1 and entries[0].rank > 0:
        return entries[0].rank
    return env_rank()


def frontend_address(addresses: List[Address], address_file: Union[str, Path, None]) -> Address:
    """The one address a frontend joins: the one given, or the address file's single entry with
    the rank from ``RANK`` when the entry names none."""
    if address_file is not None:
        if addresses:
            raise AddressError("a frontend joins one address: pass address= or address_file=, not both")
        entries = load_address_file(address_file)
        if len(entries) != 1:
            raise AddressError(
                f"a frontend joins one address but {address_file} lists {len(entries)}; "
                "give each frontend a file with its backend's entry"
            )
        entry = entries[0]
        addresses = [entry.replace(rank=entry.rank if entry.rank > 0 else env_rank())]
    if len(addresses) != 1:
        raise AddressError(f"a frontend joins exactly one address, got {len(addresses)}")
    if addresses[0].rank < 1:
        raise AddressError(f"a frontend needs rank >= 1 on its address, got {addresses[0].rank}; rank 0 is the backend")
    return addresses[0]


def check_backend_addresses(addresses: List[Address]) -> None:
    """The backend serves its addresses as rank 0."""
    for address in addresses:
        if address.rank != 0:
            raise AddressError(f"the backend serves addresses as rank 0, got rank {address.rank} in {address}")


def warn_if_no_token(token: bytes, log: Any) -> None:
    if not token:
        log.warning("no admission token (API(token=...) or OPENFL_API_TOKEN): any process can join this federation")
