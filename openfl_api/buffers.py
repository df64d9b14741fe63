"""Buffers used again once nothing refers to their memory.

A buffer of tens of MB allocated afresh for every version pays its page faults every time (the
C allocator hands memory that large back to the system when it is freed), which cost several
times the copy into it. Whether a buffer may be written again is asked of Python and torch: any
other reference alive (another name for the tensor, a view, a numpy array, a piece queued for a
pipe or a send in flight) keeps it untouched. :class:`Spares` keeps the backend's encoding
buffers of earlier versions; :func:`at_least` grows a pipe's receive buffer.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Tuple

import torch

__all__ = ["Spares", "at_least", "unused"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def at_least(buffer: torch.Tensor, size: int) -> torch.Tensor:
    """``buffer`` (1-D uint8) when it holds ``size`` bytes, else a new one of ``size`` zero bytes:
    a receive buffer only grows, and its zero padding keeps the finite check on its fast path."""
    return buffer if buffer.numel() >= size else torch.zeros(size, dtype=torch.uint8)


def unused(buffer: torch.Tensor) -> bool:
    """True when the caller's one reference is the only one to ``buffer`` and to its memory: no
    other name or container holds the tensor, no other tensor, array or send shares its storage
    (never True on a torch that cannot tell)."""
    if _use_count is None:
        return False
    # The caller's reference, this frame's and getrefcount's argument; then the storage's: the
    # tensor's own and the storage object asked for here.
    return sys.getrefcount(buffer) <= 3 and _use_count(buffer.untyped_storage()._cdata) <= 2


class Spares:
    """At most ``keep`` buffers of earlier encodings, each with the layout it was written for.

    Args:
        keep: how many retired buffers to hold (the newest are kept).
    """

    def __init__(self, keep: int = 1) -> None:
        self.keep = keep
        self._buffers: List[Tuple[Any, torch.Tensor]] = []

    def take(self, layout: Any, nbytes: int, pinned: bool) -> Optional[torch.Tensor]:
        """A retired buffer of ``layout`` (compared by identity) that nothing else refers to, or None."""
        retired, self._buffers, found = self._buffers, [], None
        while retired:
            owner, buffer = retired.pop(0)  # held by this name alone while unused() asks
            if found is None and owner is layout and buffer.numel() == nbytes and buffer.is_pinned() == pinned \
                    and unused(buffer):
                found = buffer
            else:
                self._buffers.append((owner, buffer))
        return found

    def give(self, layout: Any, buffer: torch.Tensor) -> None:
        """Retire ``buffer``, written for ``layout``: it may be handed back once nothing refers to it."""
        self._buffers.append((layout, buffer))
        del self._buffers[:-self.keep]
