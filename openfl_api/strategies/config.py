"""A step that serves a round configuration per version: ``RoundConfig(lambda version: {...})``."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

from openfl_api.errors import ConfigurationError
from openfl_api.payload.config import check_config
from openfl_api.step.base import BACKEND, Step, Transfer

__all__ = ["RoundConfig"]


class RoundConfig(Step):
    """Serve a round configuration with the downloads of each version.

    ``config`` is a dict served as it is, or a function ``version -> dict`` called once per version
    (before its first download), e.g. a learning-rate schedule::

        with ofl.StepAt(api):
            strategies.RoundConfig(lambda version: {"lr": 0.1 * 0.5 ** (version // 10), "mu": 0.01})

    Frontends read it with ``api.config`` after each ``download()``.

    Args:
        config: a dict of str to JSON values, or a callable returning one for a version.

    Raises:
        ConfigurationError: ``config`` is neither (checked now for a dict, per version for a
            function).
    """

    roles = frozenset({BACKEND})

    def __init__(self, config: Union[Mapping[str, Any], Callable[[int], Mapping[str, Any]]]) -> None:
        if callable(config):
            self._function: Optional[Callable[[int], Mapping[str, Any]]] = config
            self._fixed: Dict[str, Any] = {}
        elif isinstance(config, Mapping):
            self._function = None
            self._fixed = check_config(config, where="RoundConfig(config=...)")
        else:
            raise ConfigurationError(f"RoundConfig(config=...) must be a dict or a function version -> dict, got "
                                     f"{type(config).__name__}")
        self._version: Optional[int] = None

    def before_download(self, api: Any, transfer: Transfer) -> None:
        if self._version == api.version:
            return
        if self._function is None:
            api.config = self._fixed
        else:
            api.config = check_config(self._function(api.version),
                                            where=f"the round configuration RoundConfig made for version {api.version}")
        self._version = api.version

    def __repr__(self) -> str:
        return f"RoundConfig({'function' if self._function is not None else self._fixed!r})"
