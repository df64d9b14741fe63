"""The serve loop's checkpoints: written now, or once the steps have seen the event at hand.

:class:`Checkpoints` is the part of :class:`~openfl_api.backend.server.Server` that writes and
restores checkpoints; the format is :mod:`openfl_api.checkpoint`'s. A checkpoint a step asks for
while an event fires is written after every step of that event has run, before anything else
happens, so the saved step state includes the whole event and no download of a new version is
served before its checkpoint is on disk.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from openfl_api import checkpoint

__all__ = ["Checkpoints"]


class Checkpoints:
    """The part of :class:`~openfl_api.backend.server.Server` that writes and restores checkpoints.

    Expects ``exchange``, ``log``, ``version``, ``accepted``, ``_firing`` and
    ``_pending_checkpoints`` (an empty list) on the object.
    """

    exchange: Any
    log: Any
    version: int
    accepted: int
    _firing: int
    _pending_checkpoints: List[Tuple[str, Callable[[], Dict[str, Any]]]]

    def checkpoint(self, path: str, steps: Callable[[], Dict[str, Any]]) -> None:
        """Save a checkpoint now, or, when asked by a step, once every step has seen the event at
        hand (so the saved step state includes the whole event)."""
        if self._firing:
            self._pending_checkpoints.append((path, steps))
        else:
            self.save_checkpoint(path, steps())

    def save_checkpoint(self, path: str, steps: Optional[Dict[str, Any]] = None) -> None:
        """Write everything needed to continue to ``path`` (see :mod:`openfl_api.checkpoint`)."""
        target = checkpoint.save(path, self.exchange, steps or {})
        self.log.info(f"checkpoint of version {self.version} written to {target}")

    def load_checkpoint(self, data: Dict[str, Any], source: str) -> Dict[str, Any]:
        """Continue from a checkpoint written by :meth:`save_checkpoint`; returns the steps' state.

        Raises:
            ConfigurationError: the checkpoint does not fit this model, aggregator or optimizer.
        """
        steps = checkpoint.restore(data, source, self.exchange)
        self.exchange.epoch += 1
        self.log.info(f"resumed from {source}: version {self.version}, {self.accepted} uploads accepted")
        return steps

    def _write_pending_checkpoints(self) -> None:
        while self._pending_checkpoints:
            path, steps = self._pending_checkpoints.pop(0)
            self.save_checkpoint(path, steps())
