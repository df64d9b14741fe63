"""Data that needs no download: scikit-learn's bundled digits and FedProx's synthetic data.

:func:`load_digits` reads the 1,797 8x8 digit images that ship inside scikit-learn (an optional
extra: ``pip install 'openfl_api[digits]'``). :func:`synthetic` and :func:`synthetic_iid`
generate the synthetic federated data of FedProx from a seed.
"""

from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

from openfl_api.data._checks import Seed, _check_int, _check_number, _generator
from openfl_api.data._optional import require
from openfl_api.data.functional import stratified_split
from openfl_api.errors import ConfigurationError

__all__ = ["TrainTest", "load_digits", "synthetic", "synthetic_iid"]


class TrainTest(NamedTuple):
    """Train and test tensors of one dataset; :attr:`train` and :attr:`test` wrap them as datasets."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def train(self) -> TensorDataset:
        """``TensorDataset(x_train, y_train)``."""
        return TensorDataset(self.x_train, self.y_train)

    @property
    def test(self) -> TensorDataset:
        """``TensorDataset(x_test, y_test)``."""
        return TensorDataset(self.x_test, self.y_test)


def load_digits(*, seed: Seed, test_fraction: float = 0.25, flatten: bool = True) -> TrainTest:
    """Loads scikit-learn's digits (1,797 8x8 images of 0-9) with a stratified train/test split.

    The images ship inside scikit-learn, so nothing is downloaded. Pixels (0 to 16 in the
    original) are scaled to ``[0, 1]``. The split keeps each digit's share in both sets (see
    :func:`~openfl_api.data.stratified_split`). Partition the training set further with
    ``y_train``:

    .. code-block:: python

       digits = data.load_digits(seed=0)
       part = data.Partition(data.dirichlet(digits.y_train, num_clients=4, alpha=0.5, seed=0))
       train_set = part.subset(digits.train, client=0)

    Args:
        seed: int or :class:`numpy.random.Generator` for the split.
        test_fraction: share of samples in the test set, in ``(0, 1)``.
        flatten: features of shape ``(64,)``; False gives images of shape ``(1, 8, 8)``, channels
            first as :class:`torch.nn.Conv2d` expects.

    Returns:
        float32 features and int64 labels, train and test.

    Raises:
        ImportError: scikit-learn is not installed.
        ConfigurationError: ``test_fraction`` is not in ``(0, 1)`` or ``seed`` is invalid.
    """
    if not isinstance(flatten, bool):
        raise ConfigurationError(f"flatten must be a bool; got {flatten!r}")
    sk_datasets = require("sklearn.datasets", "digits", "scikit-learn", "load_digits()")
    bunch = sk_datasets.load_digits()
    x = torch.from_numpy((bunch.data / 16.0).astype(np.float32))
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = stratified_split(bunch.target, test_fraction, seed=seed)
    train_index, test_index = torch.from_numpy(train), torch.from_numpy(test)
    return TrainTest(x[train_index], y[train_index], x[test_index], y[test_index])


def synthetic(
    num_clients: int,
    alpha: float,
    beta: float,
    *,
    seed: Seed,
    samples_per_client: Union[None, int, Sequence[int]] = None,
    num_features: int = 60,
    num_classes: int = 10,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Generates FedProx's Synthetic(alpha, beta): every client has its own model and inputs.

    From Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Section 5.1,
    following the reference generator ``data/synthetic_*/generate_synthetic.py`` of
    https://github.com/litian96/FedProx. For client ``k``:

    * ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)``;
    * ``W_k`` (``num_features x num_classes``) and ``b_k`` (``num_classes``) with entries
      ``~ N(u_k, 1)``; ``v_k`` (``num_features``) with entries ``~ N(B_k, 1)``;
    * ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal, ``Sigma_jj = j ** -1.2`` (``j`` from 1);
    * ``y = argmax(softmax(x @ W_k + b_k))``.

    ``alpha`` controls how much the clients' models differ and ``beta`` how much their inputs
    differ; the paper uses (0, 0), (0.5, 0.5) and (1, 1). As in the reference code, ``alpha`` and
    ``beta`` are *standard deviations* (``numpy.random.normal(0, alpha)``), and the default sizes
    are the reference's ``int(LogNormal(4, 2)) + 50`` per client (the paper calls them a power
    law). The draws follow the reference's distributions, not its random stream.

    Args:
        num_clients: number of clients, >= 1.
        alpha: spread of the clients' models, >= 0.
        beta: spread of the clients' input means, >= 0.
        seed: int or :class:`numpy.random.Generator`.
        samples_per_client: one int for every client, one int per client, or None for the
            reference's log-normal sizes.
        num_features: input dimension (60 in the paper).
        num_classes: number of labels (10 in the paper).

    Returns:
        ``[(x, y), ...]``, one pair per client: float32 ``x`` of shape ``(n_k, num_features)`` and
        int64 ``y`` of shape ``(n_k,)``.

    Raises:
        ConfigurationError: an argument is out of range.
    """
    num_clients, sizes, num_features, num_classes, rng = _check_synthetic(
        num_clients, samples_per_client, num_features, num_classes, seed
    )
    alpha = _check_number("alpha", alpha, 0, strict=False)
    beta = _check_number("beta", beta, 0, strict=False)
    sizes = _synthetic_sizes(num_clients, sizes, rng)
    model_means = rng.normal(0.0, alpha, num_clients)
    input_means = rng.normal(rng.normal(0.0, beta, num_clients)[:, None], 1.0, (num_clients, num_features))
    clients = []
    for k in range(num_clients):
        weight = rng.normal(model_means[k], 1.0, (num_features, num_classes))
        bias = rng.normal(model_means[k], 1.0, num_classes)
        clients.append(_draw(rng, int(sizes[k]), input_means[k], weight, bias))
    return clients


def synthetic_iid(
    num_clients: int,
    *,
    seed: Seed,
    samples_per_client: Union[None, int, Sequence[int]] = None,
    num_features: int = 60,
    num_classes: int = 10,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Generates FedProx's Synthetic-IID: one model and one input law shared by every client.

    As :func:`synthetic`, but ``W`` and ``b`` (entries ``~ N(0, 1)``) are drawn once for all
    clients and ``v = 0``, following ``data/synthetic_iid/generate_iid.py`` of
    https://github.com/litian96/FedProx. Only the clients' sizes differ.

    Args:
        num_clients: number of clients, >= 1.
        seed: int or :class:`numpy.random.Generator`.
        samples_per_client: one int for every client, one int per client, or None for the
            reference's log-normal sizes.
        num_features: input dimension (60 in the paper).
        num_classes: number of labels (10 in the paper).

    Returns:
        ``[(x, y), ...]`` as :func:`synthetic` returns.

    Raises:
        ConfigurationError: an argument is out of range.
    """
    num_clients, sizes, num_features, num_classes, rng = _check_synthetic(
        num_clients, samples_per_client, num_features, num_classes, seed
    )
    sizes = _synthetic_sizes(num_clients, sizes, rng)
    weight = rng.normal(0.0, 1.0, (num_features, num_classes))
    bias = rng.normal(0.0, 1.0, num_classes)
    mean = np.zeros(num_features)
    return [_draw(rng, int(size), mean, weight, bias) for size in sizes]


def _check_synthetic(
    num_clients: int,
    samples_per_client: Union[None, int, Sequence[int]],
    num_features: int,
    num_classes: int,
    seed: Seed,
) -> Tuple[int, Optional[np.ndarray], int, int, np.random.Generator]:
    num_clients = _check_int("num_clients", num_clients, 1)
    num_features = _check_int("num_features", num_features, 1)
    num_classes = _check_int("num_classes", num_classes, 2)
    sizes: Optional[np.ndarray] = None
    if isinstance(samples_per_client, numbers.Integral) and not isinstance(samples_per_client, bool):
        sizes = np.full(num_clients, _check_int("samples_per_client", samples_per_client, 1), dtype=np.int64)
    elif samples_per_client is not None:
        if isinstance(samples_per_client, (str, bytes)) or not isinstance(samples_per_client, Sequence):
            raise ConfigurationError(
                f"samples_per_client must be None, an int, or a sequence of ints; got {samples_per_client!r}"
            )
        if len(samples_per_client) != num_clients:
            raise ConfigurationError(
                f"samples_per_client must have one size per client, {num_clients}; got "
                f"{len(samples_per_client)}"
            )
        sizes = np.array(
            [_check_int(f"samples_per_client[{k}]", size, 1) for k, size in enumerate(samples_per_client)],
            dtype=np.int64,
        )
    return num_clients, sizes, num_features, num_classes, _generator(seed)


def _synthetic_sizes(num_clients: int, sizes: Optional[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The given sizes, or the reference's ``int(LogNormal(4, 2)) + 50`` per client."""
    if sizes is not None:
        return sizes
    return rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50


def _draw(
    rng: np.random.Generator, size: int, mean: np.ndarray, weight: np.ndarray, bias: np.ndarray
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples ``x ~ N(mean, diag(j ** -1.2))`` labelled ``argmax(x @ weight + bias)``."""
    scale = np.arange(1, mean.size + 1, dtype=float) ** -0.6
    x = mean + rng.standard_normal((size, mean.size)) * scale
    y = np.argmax(x @ weight + bias, axis=1)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
