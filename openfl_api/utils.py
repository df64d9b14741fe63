"""Small helpers for scripts."""

from __future__ import annotations

import time

__all__ = ["time_string"]


def time_string() -> str:
    """Return the local time as ``YYYY-MM-DD HH:MM:SS``, for print lines in training scripts."""
    return time.strftime("%Y-%m-%d %H:%M:%S")
