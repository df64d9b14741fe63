"""Backend checkpoints: one file per aggregated version, written atomically, read back exactly.

A checkpoint is a dict saved with ``torch.save`` and read with ``torch.load(path,
weights_only=True)`` (no pickled code). It holds what continuing the federation needs, each part
given by the object that owns it: the global model and the exchanged optimizer state, the server
optimizer, the version rules' bookkeeping, the aggregator's accumulation (uploads accepted for the
version in progress, and any server state it keeps), the round configuration served with the
model, the steps' state and this process's random generators. Files are written to
a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from openfl_api.errors import ConfigurationError

__all__ = ["FORMAT", "save", "restore", "write", "newest", "check", "rng_state", "set_rng_state", "step_states",
           "load_step_states"]

FORMAT = 3


def rng_state() -> Dict[str, Any]:
    """The random generators of this process (torch, numpy's global one, Python's), as tensors and ints."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["gauss"]))
    random.setstate(state["python"])


def write(path: str, parts: Dict[str, Any]) -> Path:
    """Write ``parts`` plus the format number and the random generators to ``path`` atomically."""
    target = Path(path)
    data = {"format": FORMAT, **parts, "rng": rng_state()}
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    torch.save(data, temporary)
    os.replace(temporary, target)
    return target


def save(path: str, exchange: Any, steps: Dict[str, Any]) -> Path:
    """Write a backend's checkpoint: its version rules, global model and accumulation (all held
    by ``exchange``, a :class:`~openfl_api.backend.exchange.Exchange`) and the steps' state."""
    version = exchange.versions.version
    return write(path, {
        "versions": exchange.versions.state_dict(),
        "model": exchange.model.state_dict(),
        "accumulation": exchange.accumulation.state_dict(version),
        "steps": dict(steps),
        "round_config": json.dumps(exchange.config),
    })


def restore(data: Any, source: str, exchange: Any) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save` into ``exchange`` and this process's random
    generators; returns the steps' state.

    Raises:
        ConfigurationError: not a checkpoint of this format, or it does not fit this model.
    """
    data = check(data, source)
    exchange.model.load_state_dict(data["model"], source)
    exchange.versions.load_state_dict(data["versions"])
    exchange.accumulation.load_state_dict(data["accumulation"], exchange.versions.version)
    exchange.config = json.loads(data.get("round_config", "{}"))
    set_rng_state(data["rng"])
    return dict(data["steps"])


def check(data: Any, source: str) -> Dict[str, Any]:
    """Return ``data`` if it is a checkpoint of this format, else raise ConfigurationError."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigurationError(f"{source} is not an openfl_api checkpoint of format {FORMAT} (found {found!r}); "
                                 "resume from a checkpoint written by this version of openfl_api")
    return data


def newest(prefix: str, log: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Find the newest complete checkpoint ``f"{prefix}.{version}"``; None when there is none.

    A file that fails to load (a disk error, a foreign file) is skipped with a warning and an
    older one is tried.
    """
    base = Path(prefix)
    folder = base.parent if str(base.parent) else Path(".")
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        name, _, number = path.name.rpartition(".")
        if name == base.name and number.isascii() and number.isdigit():
            found.append((int(number), path))
    for version, path in sorted(found, reverse=True):
        try:
            data = torch.load(path, weights_only=True)
        except Exception as exc:  # a damaged file: fall back to an older checkpoint
            log.warning(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); trying an older one")
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT and data.get("versions", {}).get("version") == version:
            return str(path), data
        log.warning(f"{path} is not a complete openfl_api checkpoint of format {FORMAT}; skipped")
    return None


def step_states(steps: Sequence[Any]) -> Dict[str, Any]:
    """The state of every step with ``state_dict``/``load_state_dict``, keyed by attach position and name."""
    return {key: step.state_dict() for key, step in _stateful(steps)}


def load_step_states(steps: Sequence[Any], saved: Dict[str, Any], source: str, log: Any) -> None:
    """Give each stateful step its saved state; a step with none saved starts afresh (logged)."""
    for key, step in _stateful(steps):
        if key in saved:
            step.load_state_dict(saved[key])
        else:
            log.warning(f"{source} holds no state for step {key}; it starts afresh")


def _stateful(steps: Sequence[Any]) -> List[Tuple[str, Any]]:
    return [(f"{index}:{step.name}", step) for index, step in enumerate(steps)
            if callable(getattr(step, "state_dict", None)) and callable(getattr(step, "load_state_dict", None))]
