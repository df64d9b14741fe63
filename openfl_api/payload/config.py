"""The round configuration: a small JSON object the backend serves beside the model.

Backend steps set it (``api.config = {"lr": 0.05, "mu": 0.01}``); every download carries
the current one in its header (field ``config``) and the frontend's loop reads it
(``api.config``). Both sides run :func:`check_config`, so what one side accepts the other
does too.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping

from openfl_api.errors import ConfigurationError

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "check_config"]

#: The largest round configuration, as compact JSON.
MAX_CONFIG_BYTES = 64 * 1024
#: How deep lists and objects may nest in a round configuration.
MAX_CONFIG_DEPTH = 8


def check_config(config: Any, error: type = ConfigurationError, where: str = "api.config") -> Dict[str, Any]:
    """Check a round configuration and return a fresh copy of it.

    It must be a mapping of str keys to JSON values: None, bool, int, finite float, str, and
    lists or mappings of those (tuples become lists), nested at most :data:`MAX_CONFIG_DEPTH`
    deep, and at most :data:`MAX_CONFIG_BYTES` as compact JSON.

    Args:
        config: the configuration to check.
        error: the exception to raise (the backend's setter raises ConfigurationError, the
            frontend a PayloadError for what the backend sent).
        where: how messages name the configuration.

    Raises:
        error: the configuration breaks one of the rules above.
    """
    if not isinstance(config, Mapping):
        raise error(f"{where} must be a dict of str to JSON values, e.g. {{'lr': 0.05}}; got {type(config).__name__}")
    _check_value(config, error, where, 0)
    text = json.dumps(config, separators=(",", ":"), allow_nan=False)
    if len(text.encode("utf-8")) > MAX_CONFIG_BYTES:
        raise error(f"{where} is {len(text.encode('utf-8'))} bytes as JSON; at most {MAX_CONFIG_BYTES} are allowed. "
                    "Send large values as tensors beside the model instead")
    return json.loads(text)


def _check_value(value: Any, error: type, where: str, depth: int) -> None:
    if depth > MAX_CONFIG_DEPTH:
        raise error(f"{where} nests deeper than {MAX_CONFIG_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise error(f"{where}: the int {value} is beyond 2**53, which JSON readers do not keep exactly")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise error(f"{where}: {value} is not a finite number; JSON has no inf or nan")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{where}: key {key!r} must be a str (JSON object keys are strings)")
            _check_value(item, error, f"{where}[{key!r}]", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_value(item, error, f"{where}[{index}]", depth + 1)
        return
    raise error(f"{where} holds a {type(value).__name__}; only None, bool, int, float, str, lists and dicts of "
                "them travel (convert tensors with .item() or .tolist())")
