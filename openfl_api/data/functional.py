"""Pure partitioners: split a dataset's sample indices among clients, with numpy only.

Every partitioner returns one ``int64`` index array per client. Together the arrays hold every
index in ``range(n)`` exactly once (disjoint, sizes summing to ``n``), and each array is sorted
ascending; shuffle in the ``DataLoader``. Randomness comes only from ``seed``, an int or a
:class:`numpy.random.Generator`, so the same call gives the same partition on every rank.

Internally each partitioner decides the *owner* (client) of every sample, then groups the sample
indices by owner; that one step is what makes the output a partition by construction.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from openfl_api.errors import ConfigurationError

__all__ = [
    "Seed",
    "iid",
    "dirichlet",
    "shards",
    "lognormal_quantity",
    "powerlaw_quantity",
    "stratified_split",
    "label_counts",
]

Seed = Union[int, np.random.Generator]
"""An int (a seed for :func:`numpy.random.default_rng`) or a :class:`numpy.random.Generator`."""


# --- partitioners ------------------------------------------------------------------------------


def iid(n: int, num_clients: int, *, seed: Seed, min_size: int = 1) -> List[np.ndarray]:
    """Splits ``range(n)`` into ``num_clients`` uniformly random parts of balanced sizes.

    Sizes differ by at most one: the first ``n % num_clients`` clients get one sample more.

    Args:
        n: number of samples.
        num_clients: number of parts.
        seed: int or :class:`numpy.random.Generator`.
        min_size: smallest allowed part; 0 allows empty parts when ``n < num_clients``.

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        ConfigurationError: an argument is out of range, or ``n < num_clients * min_size``.
    """
    n = _check_int("n", n, 1)
    num_clients, min_size = _check_clients(n, num_clients, min_size)
    rng = _generator(seed)
    return _split_by_size(_balanced(n, num_clients), rng)


def dirichlet(
    labels: Any, num_clients: int, alpha: float, *, seed: Seed, min_size: int = 1
) -> List[np.ndarray]:
    """Splits samples with label skew: each label's samples spread over clients by Dir(alpha).

    For each label ``k`` a proportion vector ``p_k ~ Dir(alpha, ..., alpha)`` over the clients is
    drawn once, and client ``j`` gets ``p_k[j]`` of label ``k``'s samples (counts rounded by
    largest remainder, so they sum exactly). This is the "hetero-dir" split of Yurochkin et al.
    (2019) and Wang et al. (2020), NIID-Bench's ``p_k ~ Dir_N(beta)``. Small ``alpha`` gives each
    label to few clients; large ``alpha`` approaches an IID split.

    Clients left with fewer than ``min_size`` samples are then repaired deterministically, never
    by resampling, so the call always finishes: one client at a time (lowest id first), samples
    move to it from the largest client's most frequent label, never taking a donor below
    ``min_size``. With ``alpha=0.01`` most clients start empty and receive ``min_size`` samples
    of one label this way.

    Args:
        labels: integer label of every sample (array-like or tensor of shape ``(n,)``).
        num_clients: number of parts.
        alpha: Dirichlet concentration, > 0.
        seed: int or :class:`numpy.random.Generator`.
        min_size: smallest allowed part; 0 allows empty parts.

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        ConfigurationError: an argument is out of range, or ``n < num_clients * min_size``.
    """
    inverse, class_sizes = _classes(labels)
    n = inverse.size
    num_clients, min_size = _check_clients(n, num_clients, min_size)
    alpha = _check_number("alpha", alpha, 0)
    rng = _generator(seed)
    proportions = rng.dirichlet(np.full(num_clients, alpha), size=class_sizes.size)
    counts = _apportion(class_sizes, proportions)
    _repair(counts, min_size)
    return _split_by_counts(inverse, counts, rng)


def shards(
    labels: Any,
    num_clients: int,
    shards_per_client: Optional[int] = None,
    *,
    labels_per_client: Optional[int] = None,
    seed: Seed,
) -> List[np.ndarray]:
    """Splits samples with label skew by sorted shards or by a fixed number of labels per client.

    Give at most one of the two; with neither, ``shards_per_client=2``.

    ``shards_per_client=s`` (McMahan et al., 2017): the samples are sorted by label (random
    order within a label), cut into ``num_clients * s`` contiguous shards whose sizes differ by at
    most one, and each client gets ``s`` shards at random. A client holds at most ``s`` labels
    plus one per shard that straddles a label boundary.

    ``labels_per_client=c`` (NIID-Bench's "#C=c", Li et al., 2022): each client gets exactly ``c``
    distinct labels, and each label's samples are split evenly among the clients that hold it.
    Labels are dealt so that every label has an owner and the numbers of owners differ by at most
    one (each client takes the ``c`` labels with the fewest owners so far, ties broken at random).

    Args:
        labels: integer label of every sample (array-like or tensor of shape ``(n,)``).
        num_clients: number of parts.
        shards_per_client: shards per client, >= 1.
        labels_per_client: distinct labels per client, between 1 and the number of labels.
        seed: int or :class:`numpy.random.Generator`.

    Returns:
        One sorted ``int64`` index array per client; none is empty.

    Raises:
        ConfigurationError: both counts given, an argument out of range, fewer samples than
            shards, too few clients to hold every label, or a label with fewer samples than
            clients holding it.
    """
    inverse, class_sizes = _classes(labels)
    n, num_classes = inverse.size, class_sizes.size
    num_clients, _ = _check_clients(n, num_clients, 1)
    if shards_per_client is not None and labels_per_client is not None:
        raise ConfigurationError(
            f"shards() takes shards_per_client or labels_per_client, not both; got "
            f"shards_per_client={shards_per_client!r} and labels_per_client={labels_per_client!r} "
            f"(pass one of them)"
        )
    if labels_per_client is None:
        per_client = _check_int("shards_per_client", 2 if shards_per_client is None else shards_per_client, 1)
        num_shards = num_clients * per_client
        if n < num_shards:
            raise ConfigurationError(
                f"shards() needs at least one sample per shard: {num_clients} clients x "
                f"{per_client} shards = {num_shards} shards, but only {n} samples (use fewer "
                f"clients or shards_per_client)"
            )
        rng = _generator(seed)
        order = _order_by_class(inverse, rng)
        shard_of_position = np.repeat(np.arange(num_shards), _balanced(n, num_shards))
        owner_of_shard = rng.permutation(np.repeat(np.arange(num_clients), per_client))
        owner = np.empty(n, dtype=np.int64)
        owner[order] = owner_of_shard[shard_of_position]
        return _split_by_owner(owner, num_clients)

    per_client = _check_int("labels_per_client", labels_per_client, 1)
    if per_client > num_classes:
        raise ConfigurationError(
            f"labels_per_client must be at most the number of distinct labels, {num_classes}; "
            f"got {per_client}"
        )
    if num_clients * per_client < num_classes:
        raise ConfigurationError(
            f"{num_clients} clients x {per_client} labels each cannot hold all {num_classes} "
            f"labels, so some samples would belong to no client (need num_clients * "
            f"labels_per_client >= {num_classes})"
        )
    rng = _generator(seed)
    holds = np.zeros((num_classes, num_clients), dtype=bool)
    owners = np.zeros(num_classes)
    for client in range(num_clients):
        chosen = np.argpartition(owners + rng.random(num_classes), per_client - 1)[:per_client]
        holds[chosen, client] = True
        owners[chosen] += 1
    short = np.flatnonzero(class_sizes < owners)
    if short.size:
        k = short[0]
        raise ConfigurationError(
            f"label {_class_values(labels)[k].item()!r} has {class_sizes[k]} samples but is dealt to "
            f"{int(owners[k])} clients, so some would not get it (use fewer clients or "
            f"labels_per_client)"
        )
    counts = np.zeros((num_classes, num_clients), dtype=np.int64)
    for k in range(num_classes):
        holders = rng.permutation(np.flatnonzero(holds[k]))
        counts[k, holders] = _balanced(int(class_sizes[k]), holders.size)
    return _split_by_counts(inverse, counts, rng)


def lognormal_quantity(
    n: int, num_clients: int, sigma: float, *, seed: Seed, min_size: int = 1
) -> List[np.ndarray]:
    """Splits ``range(n)`` uniformly at random into parts whose sizes follow a log-normal law.

    Client ``j`` draws a weight ``w_j ~ LogNormal(0, sigma)`` and gets
    ``min_size + (n - num_clients * min_size) * w_j / sum(w)`` samples, rounded by largest
    remainder so the sizes sum to ``n``. So ``log(size)`` has standard deviation about ``sigma``
    once sizes are well above ``min_size``; ``sigma=0`` gives balanced sizes.

    Args:
        n: number of samples.
        num_clients: number of parts.
        sigma: standard deviation of the log of the sizes, >= 0.
        seed: int or :class:`numpy.random.Generator`.
        min_size: smallest allowed part; 0 allows empty parts.

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        ConfigurationError: an argument is out of range, or ``n < num_clients * min_size``.
    """
    n = _check_int("n", n, 1)
    num_clients, min_size = _check_clients(n, num_clients, min_size)
    sigma = _check_number("sigma", sigma, 0, strict=False)
    rng = _generator(seed)
    weights = rng.lognormal(0.0, sigma, num_clients)
    return _split_by_size(_sizes_from_weights(n, weights, min_size), rng)


def powerlaw_quantity(
    n: int, num_clients: int, exponent: float, *, seed: Seed, min_size: int = 1
) -> List[np.ndarray]:
    """Splits ``range(n)`` uniformly at random into parts whose sizes follow a power law.

    Client ``j`` draws a weight ``w_j`` from the Pareto law with density proportional to
    ``w ** -exponent`` on ``w >= 1`` and gets
    ``min_size + (n - num_clients * min_size) * w_j / sum(w)`` samples, rounded by largest
    remainder so the sizes sum to ``n``. Smaller exponents give heavier tails: a few clients
    hold most of the data. The sizes' tail index (the Pareto shape) is ``exponent - 1``.

    Args:
        n: number of samples.
        num_clients: number of parts.
        exponent: exponent of the density, > 1.
        seed: int or :class:`numpy.random.Generator`.
        min_size: smallest allowed part; 0 allows empty parts.

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        ConfigurationError: an argument is out of range, or ``n < num_clients * min_size``.
    """
    n = _check_int("n", n, 1)
    num_clients, min_size = _check_clients(n, num_clients, min_size)
    exponent = _check_number(
        "exponent", exponent, 1, hint=" (the density w ** -exponent needs it to be normalised; 1.5 to 3 are usual)"
    )
    rng = _generator(seed)
    weights = 1.0 + rng.pareto(exponent - 1.0, num_clients)
    return _split_by_size(_sizes_from_weights(n, weights, min_size), rng)


# --- helpers users call too --------------------------------------------------------------------


def stratified_split(labels: Any, test_fraction: float, *, seed: Seed) -> Tuple[np.ndarray, np.ndarray]:
    """Splits sample indices into train and test sets that keep each label's share.

    The test set has ``round(test_fraction * n)`` samples, shared among labels in proportion
    to their sizes (largest remainder); within a label the test samples are drawn at random.

    Args:
        labels: integer label of every sample (array-like or tensor of shape ``(n,)``).
        test_fraction: share of samples in the test set, in ``(0, 1)``.
        seed: int or :class:`numpy.random.Generator`.

    Returns:
        ``(train, test)``: sorted ``int64`` index arrays, disjoint, together ``range(n)``.

    Raises:
        ConfigurationError: ``test_fraction`` is not in ``(0, 1)`` or leaves a side empty.
    """
    inverse, class_sizes = _classes(labels)
    n = inverse.size
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ConfigurationError(f"test_fraction must be a number in (0, 1); got {test_fraction!r}")
    test_total = round(test_fraction * n)
    if not 0 < test_total < n:
        raise ConfigurationError(
            f"test_fraction={test_fraction} of {n} samples leaves the train or the test set "
            f"empty (pick a fraction between {1 / n:.3g} and {1 - 1 / n:.3g})"
        )
    rng = _generator(seed)
    test_counts = _apportion(np.array([test_total]), class_sizes[None, :].astype(float))[0]
    order = _order_by_class(inverse, rng)
    starts = np.concatenate(([0], np.cumsum(class_sizes)[:-1]))
    sorted_classes = inverse[order]
    rank_in_class = np.arange(n) - starts[sorted_classes]
    is_test = np.empty(n, dtype=bool)
    is_test[order] = rank_in_class < test_counts[sorted_classes]
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def label_counts(indices: Sequence[Any], labels: Any, num_classes: Optional[int] = None) -> np.ndarray:
    """Counts each client's samples per label.

    Args:
        indices: one index array per client, as the partitioners return.
        labels: label of every sample, integers in ``[0, num_classes)``.
        num_classes: number of columns; defaults to ``max(labels) + 1``.

    Returns:
        ``int64`` array of shape ``(num_clients, num_classes)``; row ``j`` counts client ``j``'s
        samples of each label.

    Raises:
        ConfigurationError: labels negative or not below ``num_classes``, or indices not integer
            arrays inside ``range(len(labels))``.
    """
    labels = _labels(labels)
    num_classes = _num_classes(labels, num_classes)
    parts = _check_indices(indices, labels.size)
    sizes = np.array([part.size for part in parts], dtype=np.int64)
    clients = np.repeat(np.arange(len(parts)), sizes)
    flat = labels[np.concatenate(parts)] if parts else np.zeros(0, dtype=np.int64)
    counts = np.bincount(clients * num_classes + flat, minlength=len(parts) * num_classes)
    return counts.reshape(len(parts), num_classes).astype(np.int64)


# --- internals ---------------------------------------------------------------------------------


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
