"""Argument checks shared by the data package: seeds, counts, numbers, labels and index arrays.

Each function returns the value in the form the callers compute with (an int, a float, a
:class:`numpy.random.Generator`, ``int64`` arrays) or raises ConfigurationError saying what must
hold and how to fix it. Private to :mod:`openfl_api.data`; :data:`Seed` is public there.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from openfl_api.errors import ConfigurationError

__all__ = ["Seed"]

Seed = Union[int, np.random.Generator]
"""An int (a seed for :func:`numpy.random.default_rng`) or a :class:`numpy.random.Generator`."""


def _generator(seed: Seed) -> np.random.Generator:
    """Returns ``seed`` as a Generator; None is refused so that every rank splits alike."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigurationError(
            f"seed must be a non-negative int or a numpy.random.Generator; got {seed!r} (every "
            f"rank must build the same partition, so pass the same int, e.g. seed=0, on every "
            f"rank)"
        )
    return np.random.default_rng(int(seed))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _check_number(name: str, value: Any, bound: float, strict: bool = True, hint: str = "") -> float:
    """Returns ``value`` as a float after checking it is finite and above ``bound``."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > bound if strict else value >= bound)
    )
    if not ok:
        relation = ">" if strict else ">="
        raise ConfigurationError(f"{name} must be a finite number {relation} {bound:g}; got {value!r}{hint}")
    return float(value)


def _check_clients(n: int, num_clients: Any, min_size: Any) -> Tuple[int, int]:
    """Validates ``num_clients`` and ``min_size`` against ``n`` samples."""
    num_clients = _check_int("num_clients", num_clients, 1)
    min_size = _check_int("min_size", min_size, 0)
    if n < num_clients * min_size:
        raise ConfigurationError(
            f"{n} samples cannot give {num_clients} clients at least {min_size} each (needs "
            f"{num_clients * min_size}); use fewer clients, a smaller min_size, or min_size=0 to "
            f"allow empty clients"
        )
    return num_clients, min_size


def _labels(labels: Any) -> np.ndarray:
    """Returns ``labels`` as a 1-D int64 array (tensors on any device are accepted)."""
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ConfigurationError(
            f"labels must be a non-empty 1-D sequence, one label per sample; got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ConfigurationError(
            f"labels must be integers; got dtype {array.dtype} (cast them, e.g. "
            f"labels.astype(int) or tensor.long())"
        )
    return array.astype(np.int64, copy=False)


def _classes(labels: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Returns each sample's class index (into the sorted distinct labels) and class sizes."""
    inverse = np.unique(_labels(labels), return_inverse=True)[1].reshape(-1).astype(np.int64)
    return inverse, np.bincount(inverse)


def _class_values(labels: Any) -> np.ndarray:
    return np.unique(_labels(labels))


def _num_classes(labels: np.ndarray, num_classes: Optional[int]) -> int:
    if labels.size and labels.min() < 0:
        raise ConfigurationError(
            f"labels must be >= 0 to be counted; got {labels.min()} (map them to 0..K-1, e.g. "
            f"with numpy.unique(labels, return_inverse=True))"
        )
    if num_classes is None:
        return int(labels.max()) + 1
    num_classes = _check_int("num_classes", num_classes, 1)
    if labels.max() >= num_classes:
        raise ConfigurationError(
            f"labels must be below num_classes={num_classes}; got label {labels.max()} (pass "
            f"num_classes={labels.max() + 1} or more)"
        )
    return num_classes


def _check_indices(indices: Sequence[Any], n: int) -> List[np.ndarray]:
    """Returns ``indices`` as int64 arrays, each 1-D and inside ``range(n)``."""
    parts = []
    for client, part in enumerate(indices):
        array = np.asarray(part)
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise ConfigurationError(
                f"client {client}'s indices must be a 1-D integer array; got shape {array.shape} "
                f"of dtype {array.dtype}"
            )
        array = array.astype(np.int64, copy=False)
        if array.size and (array.min() < 0 or array.max() >= n):
            raise ConfigurationError(
                f"client {client}'s indices must lie in range({n}); got values from {array.min()} "
                f"to {array.max()} (partition the same dataset whose labels you pass)"
            )
        parts.append(array)
    return parts
