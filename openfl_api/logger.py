"""Logging through loguru, with the rank and role of the API on every line.

Library modules never add sinks; they log through :func:`bind`. Entry points (the user's script,
the launcher) choose where lines go with :func:`log_level` and :func:`log_to_file`::

    import openfl_api as ofl
    ofl.logger.log_level("INFO")              # stderr, INFO and above
    ofl.logger.log_to_file("rank.log")        # and a file, DEBUG and above

INFO is used for lifecycle (joined, version N, stopped because ...), DEBUG per transfer.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Optional, Union

from loguru import logger as _loguru

__all__ = ["FORMAT", "log_level", "log_to_file", "bind", "logger"]

FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {extra[role]}:{extra[rank]} | "
    "{name}:{line} - {message}"
)
LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")

logger = _loguru.bind(role="-", rank="-")
_sinks = {"stderr": None}
_sinks_lock = threading.Lock()  # log_level may be called by several ranks' threads at once (simulate)


def _check_level(level: str) -> str:
    upper = str(level).upper()
    if upper not in LEVELS:
        from openfl_api.errors import ConfigurationError

        raise ConfigurationError(f"log level must be one of {LEVELS}, got {level!r}")
    return upper


def log_level(level: str = "INFO") -> None:
    """Send log lines at ``level`` and above to stderr, replacing loguru's default sink."""
    level = _check_level(level)
    with _sinks_lock:
        for sink_id in (0, _sinks["stderr"]):
            if sink_id is not None:
                try:
                    _loguru.remove(sink_id)
                except ValueError:
                    pass
        _sinks["stderr"] = _loguru.add(sys.stderr, level=level, format=FORMAT, filter=_has_context)


def log_to_file(path: Union[str, Path], level: str = "DEBUG") -> int:
    """Also write log lines at ``level`` and above to ``path``; returns the loguru sink id."""
    return _loguru.add(str(path), level=_check_level(level), format=FORMAT, filter=_has_context, enqueue=False)


def _has_context(record: Any) -> bool:
    record["extra"].setdefault("role", "-")
    record["extra"].setdefault("rank", "-")
    return True


def bind(role: str, rank: Optional[int] = None, **extra: Any) -> Any:
    """Return a logger whose lines carry ``role`` and ``rank``."""
    return _loguru.bind(role=role, rank="-" if rank is None else rank, **extra)
