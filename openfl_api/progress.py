"""The backend's progress line: version i of N, rate, time left and the last metrics, from tqdm.

It is drawn (and redrawn in place) when its output is a terminal, and stays quiet otherwise, so
log files never fill with redraws. Its output is the backend's stderr; under
``python -m openfl_api.launch --logdir DIR`` the backend's stderr is its log file, so the
launcher hands the backend its own terminal for the line instead (``OPENFL_PROGRESS_FD``, a
file descriptor the backend inherits), and the line shows on the launcher's console::

    version: 67%|██████▋   | 2/3 [00:01<00:00,  1.52 versions/s, loss 0.0412]

N is the ``max_version`` of a ``StopAtVersion`` step; without one the line counts versions and
shows no time left.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any, Dict, Mapping, Optional

from openfl_api.errors import ConfigurationError
from openfl_api.launch.config import PROGRESS_FD_VAR
from openfl_api.parser import environ

__all__ = ["Progress", "postfix"]

SHOWN = 4  # metrics on the line


def _stream() -> IO[str]:
    fd = environ().get(PROGRESS_FD_VAR)
    if fd:
        try:
            return os.fdopen(int(fd), "w", closefd=False)
        except (ValueError, OSError):
            pass  # not an open descriptor here (a stale variable): the backend's stderr, as without it
    return sys.stderr


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def postfix(latest: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """``"loss 0.0412, federated accuracy 0.9123"``: the mean of the newest metrics of each kind."""
    parts = []
    for kind, metrics in latest.items():
        for name, stats in sorted(metrics.items()):
            value = stats.get("mean") if isinstance(stats, Mapping) else None
            if isinstance(value, (int, float)):
                parts.append(f"{name if kind == 'train' else f'{kind} {name}'} {value:.4g}")
    return ", ".join(parts[:SHOWN])


class Progress:
    """A tqdm bar fed the record's entries.

    Args:
        stream: where to draw it.
        total: the version the federation stops at, or None.
        initial: the version the serve loop starts at.
    """

    def __init__(self, stream: IO[str], total: Optional[int], initial: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=min(initial, total) if total is not None else initial, desc="version",
                         unit=" versions", file=stream, dynamic_ncols=True, leave=True, smoothing=0.3)
        self._latest: Dict[str, Mapping[str, Mapping[str, Any]]] = {}

    @classmethod
    def open(cls, mode: Optional[bool], total: Optional[int], initial: int, log: Any) -> Optional["Progress"]:
        """The progress line ``Record(progress=mode)`` asks for, or None when there is none.

        Raises:
            ConfigurationError: ``mode`` is True and tqdm is not installed.
        """
        if mode is False:
            return None
        stream = _stream()
        if mode is None and not _is_terminal(stream):
            return None
        try:
            import tqdm  # noqa: F401
        except ImportError:
            if mode:
                raise ConfigurationError("Record(progress=True) needs tqdm: pip install 'openfl_api[progress]'") from None
            log.debug("no progress line: tqdm is not installed (pip install 'openfl_api[progress]')")
            return None
        return cls(stream, total, initial)

    def write(self, entry: Mapping[str, Any]) -> None:
        """Move the bar to a new version; show the newest metrics."""
        event = entry.get("event")
        if event == "version":
            if entry.get("metrics"):
                self._latest["train"] = entry["metrics"]
            self._bar.update(max(0, int(entry["version"]) - self._bar.n))
        elif event == "evaluation" and entry.get("metrics"):
            self._latest[str(entry["kind"])] = entry["metrics"]
        else:
            return
        self._bar.set_postfix_str(postfix(self._latest))

    def close(self) -> None:
        self._bar.close()
