"""Encoding buffers used again once nothing refers to their memory.

A model of tens of MB encoded into a fresh buffer for every version pays the page faults of that
buffer every time, which cost several times the copy itself. :class:`Spares` keeps
the buffers of earlier encodings and hands one back for the next encoding of the same layout once
no other reference to its memory is alive: no piece queued for a pipe, no send in flight, no view
or numpy array a receiver kept. Whether a buffer is unused is asked of torch (the use count of
its storage), so a buffer still referenced anywhere is never written.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

__all__ = ["Spares", "unused"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def unused(buffer: torch.Tensor) -> bool:
    """True when ``buffer`` is the only reference to its memory (never True on a torch that cannot tell)."""
    if _use_count is None:
        return False
    # One reference is the buffer's own, one the storage object asked for here.
    return _use_count(buffer.untyped_storage()._cdata) <= 2


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
        for index, (owner, buffer) in enumerate(self._buffers):
            if owner is layout and buffer.numel() == nbytes and buffer.is_pinned() == pinned and unused(buffer):
                del self._buffers[index]
                return buffer
        return None

    def give(self, layout: Any, buffer: torch.Tensor) -> None:
        """Retire ``buffer``, written for ``layout``: it may be handed back once nothing refers to it."""
        self._buffers.append((layout, buffer))
        del self._buffers[:-self.keep]
