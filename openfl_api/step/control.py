"""Steps that end a federation: ``StopAtVersion``, ``StopAtLoop``."""

from __future__ import annotations

from typing import Any

from openfl_api.errors import ConfigurationError
from openfl_api.step.base import BACKEND, Step

__all__ = ["StopAtVersion", "StopAtLoop"]


class StopAtVersion(Step):
    """Stop the federation once the global version reaches ``max_version``."""

    roles = frozenset({BACKEND})

    def __init__(self, max_version: int) -> None:
        if not isinstance(max_version, int) or isinstance(max_version, bool) or max_version < 1:
            raise ConfigurationError(f"StopAtVersion(max_version=...) must be an integer >= 1, got {max_version!r}")
        self.max_version = max_version

    def _check(self, api: Any) -> None:
        if api.version >= self.max_version:
            api.stop(f"version {api.version} reached max_version={self.max_version}")

    def at_loop(self, api: Any) -> None:
        self._check(api)

    def after_aggregate(self, api: Any) -> None:
        self._check(api)

    def __repr__(self) -> str:
        return f"StopAtVersion(max_version={self.max_version})"


class StopAtLoop(Step):
    """Stop the federation after ``max_loop`` serve-loop iterations."""

    roles = frozenset({BACKEND})

    def __init__(self, max_loop: int) -> None:
        if not isinstance(max_loop, int) or isinstance(max_loop, bool) or max_loop < 1:
            raise ConfigurationError(f"StopAtLoop(max_loop=...) must be an integer >= 1, got {max_loop!r}")
        self.max_loop = max_loop

    def at_loop(self, api: Any) -> None:
        if api.loop_count >= self.max_loop:
            api.stop(f"loop {api.loop_count} reached max_loop={self.max_loop}")

    def __repr__(self) -> str:
        return f"StopAtLoop(max_loop={self.max_loop})"
