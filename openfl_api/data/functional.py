"""Pure partitioners: split a dataset's sample indices among clients, with numpy only.

Every partitioner returns one ``int64`` index array per client. Together the arrays hold every
index in ``range(n)`` exactly once (disjoint, sizes summing to ``n``), and each array is sorted
ascending; shuffle in the ``DataLoader``. Randomness comes only from ``seed``, an int or a
:class:`numpy.random.Generator`, so the same call gives the same partition on every rank.

Internally each partitioner decides the *owner* (client) of every sample, then groups the sample
indices by owner; that one step is what makes the output a partition by construction.
"""

from __future__ import annotations

import numbers
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from openfl_api.data._checks import (
    Seed,
    _check_clients,
    _check_indices,
    _check_int,
    _check_number,
    _class_values,
    _classes,
    _generator,
    _labels,
    _num_classes,
)
from openfl_api.data._split import (
    _apportion,
    _balanced,
    _order_by_class,
    _repair,
    _sizes_from_weights,
    _split_by_counts,
    _split_by_owner,
    _split_by_size,
)
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
