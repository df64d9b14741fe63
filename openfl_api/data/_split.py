"""The index arithmetic behind the partitioners and :func:`~openfl_api.data.stratified_split`.

Counts are apportioned by largest remainder (and topped up to a minimum size); each sample then
gets an owner (a client), and the sample indices are grouped by owner, which makes the output a
partition by construction. Private to :mod:`openfl_api.data`.
"""

from __future__ import annotations

from typing import List

import numpy as np

__all__: List[str] = []


def _balanced(total: int, parts: int) -> np.ndarray:
    """Sizes of ``parts`` near-equal parts of ``total``; the first ``total % parts`` get one more."""
    return total // parts + (np.arange(parts) < total % parts).astype(np.int64)


def _apportion(totals: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Splits each ``totals[i]`` in proportion to row ``weights[i]`` (largest remainder method).

    Returns int64 counts of ``weights``' shape whose rows sum exactly to ``totals``; remainders are
    handed out by decreasing fractional part, ties to the lower column.
    """
    shares = weights / weights.sum(axis=1, keepdims=True) * np.asarray(totals, dtype=float)[:, None]
    counts = np.floor(shares).astype(np.int64)
    remainder = np.asarray(totals, dtype=np.int64) - counts.sum(axis=1)
    order = np.argsort(counts - shares, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), axis=1)
    return counts + (ranks < remainder[:, None])


def _sizes_from_weights(n: int, weights: np.ndarray, min_size: int) -> np.ndarray:
    """``min_size`` each plus the rest of ``n`` in proportion to ``weights``."""
    rest = n - weights.size * min_size
    return min_size + _apportion(np.array([rest]), weights[None, :])[0]


def _repair(counts: np.ndarray, min_size: int) -> None:
    """Tops every client (column of ``counts``) up to ``min_size`` samples, in place.

    For each short client in id order, samples move from the largest client's most frequent
    label. The largest client always has more than ``min_size`` while one is short (the total is
    at least ``num_clients * min_size``), so every move is at least one sample and this ends after
    at most ``num_clients * (num_classes + 1)`` moves.
    """
    sizes = counts.sum(axis=0)
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            donor = int(np.argmax(sizes))
            label = int(np.argmax(counts[:, donor]))
            amount = min(min_size - sizes[client], sizes[donor] - min_size, counts[label, donor])
            counts[label, donor] -= amount
            counts[label, client] += amount
            sizes[donor] -= amount
            sizes[client] += amount


def _order_by_class(inverse: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample indices sorted by class, in random order within each class."""
    shuffled = rng.permutation(inverse.size)
    return shuffled[np.argsort(_narrow(inverse[shuffled], int(inverse.max())), kind="stable")]


def _narrow(keys: np.ndarray, largest: int) -> np.ndarray:
    """``keys`` (0 to ``largest``) in the narrowest unsigned dtype.

    A stable argsort of 8- or 16-bit keys is numpy's radix sort, O(n), several times faster than
    the merge sort it uses for int64.
    """
    return keys.astype(np.min_scalar_type(largest), copy=False)


def _split_by_counts(inverse: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> List[np.ndarray]:
    """Gives client ``j`` ``counts[k, j]`` random samples of class ``k``, for every ``k``."""
    num_classes, num_clients = counts.shape
    owner = np.empty(inverse.size, dtype=np.int64)
    owner[_order_by_class(inverse, rng)] = np.repeat(np.tile(np.arange(num_clients), num_classes), counts.ravel())
    return _split_by_owner(owner, num_clients)


def _split_by_size(sizes: np.ndarray, rng: np.random.Generator) -> List[np.ndarray]:
    """Gives client ``j`` ``sizes[j]`` samples drawn uniformly at random."""
    return _split_by_owner(rng.permutation(np.repeat(np.arange(sizes.size), sizes)), sizes.size)


def _split_by_owner(owner: np.ndarray, num_clients: int) -> List[np.ndarray]:
    """Groups ``range(len(owner))`` by owner: client ``j`` gets the sorted indices it owns."""
    order = np.argsort(_narrow(owner, num_clients - 1), kind="stable").astype(np.int64, copy=False)
    bounds = np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]
    return np.split(order, bounds)
