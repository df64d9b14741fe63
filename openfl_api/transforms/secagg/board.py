"""The board: signed JSON values on the stores, where a round's stages are posted and read."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from typing import Any, Callable, Sequence

from openfl_api.transforms import crypto
from openfl_api.transforms.secagg.settings import FederationEnded, SecAggFailure

__all__ = ["Board", "ENDED_EVERY", "b64", "unb64"]

#: Seconds between a waiting frontend's checks whether the backend recorded the end of the federation.
ENDED_EVERY = 0.5


class Board:
    """Signed JSON values on a store under ``transforms/<run>/secagg/``, with the bytes counted.

    Args:
        stores: the stores to write to (the backend serves several addresses) and read from.
        run: the backend's run id (fresh per backend start, so an old file store never confuses).
        token: the admission token (the HMAC key).
    """

    def __init__(self, stores: Sequence[Any], run: str, token: bytes) -> None:
        self.stores = list(stores)
        self.prefix = f"transforms/{run}/secagg/"
        self.token = token
        self.sent = 0
        self.received = 0

    def put(self, key: str, value: Any) -> None:
        full = self.prefix + key
        body = json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")
        raw = json.dumps({"v": body.decode("utf-8"), "mac": crypto.mac(self.token, full, body)}).encode("utf-8")
        for store in self.stores:
            store.set(full, raw)
            self.sent += len(raw)

    def append(self, stage: str, value: Any, store: Any = None) -> None:
        """Write ``value`` to the next free slot of ``stage`` (``<stage>/<n>``)."""
        target = store if store is not None else self.stores[0]
        slot = target.add(self.prefix + f"{stage}/n", 1) - 1
        one = Board([target], "", self.token)
        one.prefix = self.prefix
        one.put(f"{stage}/{slot}", value)
        self.sent += one.sent

    def has(self, key: str, store: Any = None) -> bool:
        return (store if store is not None else self.stores[0]).check([self.prefix + key])

    def get(self, key: str, store: Any = None) -> Any:
        """The value at ``key``; raise SecAggFailure if its HMAC does not check (altered or foreign)."""
        full = self.prefix + key
        raw = (store if store is not None else self.stores[0]).get(full)
        self.received += len(raw)
        try:
            outer = json.loads(raw.decode("utf-8"))
            body = outer["v"].encode("utf-8")
            tag = outer["mac"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SecAggFailure(f"store value {full!r} is not a signed JSON value") from None
        if not isinstance(tag, str) or not crypto.check_mac(self.token, full, body, tag):
            raise SecAggFailure(f"store value {full!r} failed its HMAC check (altered, or written without the "
                                "admission token)")
        return json.loads(body.decode("utf-8"))

    def count(self, stage: str, store: Any) -> int:
        return int(store.add(self.prefix + f"{stage}/n", 0))

    def wait(self, keys: Sequence[str], timeout: timedelta, what: str, log: Any, interval: timedelta,
             ended: Callable[[], Any] = lambda: None) -> str:
        """Wait up to ``timeout`` for the first of ``keys``; return it, logging while it lasts.

        Raises:
            FederationEnded: ``ended()`` says the backend recorded the end of the federation.
            SecAggFailure: ``timeout`` ran out.
        """
        from openfl_api.waiting import logged

        deadline = time.monotonic() + timeout.total_seconds()
        delay, asked = 0.002, time.monotonic()
        with logged(log, interval, what):
            while True:
                for key in keys:
                    if self.has(key):
                        return key
                if time.monotonic() - asked >= ENDED_EVERY:  # asking may open a store connection: not too often
                    asked = time.monotonic()
                    if ended():
                        raise FederationEnded()
                if time.monotonic() >= deadline:
                    raise SecAggFailure(f"waited {timeout} for {what}")
                time.sleep(delay)
                delay = min(2 * delay, 0.05)


def b64(data: bytes) -> str:
    """``data`` as base64 text, for a JSON value."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any) -> bytes:
    """The bytes of base64 ``text``; raise SecAggFailure if it is not base64 text."""
    if not isinstance(text, str):
        raise SecAggFailure("a binary field is not base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SecAggFailure("a binary field is not base64 text") from None
