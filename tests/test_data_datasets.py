"""Tests of the bundled and generated data: scikit-learn's digits and FedProx's synthetic data."""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from openfl_api import data
from openfl_api.errors import ConfigurationError

Clients = List[Tuple[torch.Tensor, torch.Tensor]]


# --- digits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sklearn_datasets():
    return pytest.importorskip("sklearn.datasets", reason="load_digits needs scikit-learn: pip install 'openfl_api[digits]'")


@pytest.fixture(scope="module")
def digits(sklearn_datasets) -> data.TrainTest:
    return data.load_digits(seed=0)


def test_digits_have_64_float32_features_in_0_1(digits: data.TrainTest) -> None:
    x = digits.x_train
    assert (x.dtype, x.shape[1], x.min().item(), x.max().item()) == (torch.float32, 64, 0.0, 1.0)


def test_digits_labels_are_int64_digits(digits: data.TrainTest) -> None:
    y = torch.cat([digits.y_train, digits.y_test])
    assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == list(range(10))


def test_digits_split_a_quarter_off_for_testing(digits: data.TrainTest) -> None:
    assert (len(digits.x_train), len(digits.y_train), len(digits.x_test), len(digits.y_test)) == (1348, 1348, 449, 449)


def test_digits_split_keeps_each_digits_share(digits: data.TrainTest) -> None:
    test = torch.bincount(digits.y_test, minlength=10).numpy()
    total = test + torch.bincount(digits.y_train, minlength=10).numpy()
    assert np.abs(test - 449 * total / 1797).max() < 1


def test_digits_train_and_test_together_are_the_whole_dataset(digits: data.TrainTest, sklearn_datasets) -> None:
    whole = np.concatenate([digits.x_train.numpy(), digits.x_test.numpy()]) * 16
    expected = sklearn_datasets.load_digits().data
    assert np.array_equal(sort_rows(np.round(whole)), sort_rows(expected))


def sort_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def test_digits_split_is_seeded(sklearn_datasets) -> None:
    a, b, c = (data.load_digits(seed=s).x_test for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_digits_as_images_are_channels_first(sklearn_datasets) -> None:
    digits = data.load_digits(seed=0, flatten=False)
    assert digits.x_train.shape == (1348, 1, 8, 8)


def test_digits_test_fraction(sklearn_datasets) -> None:
    assert len(data.load_digits(seed=0, test_fraction=0.1).y_test) == 180


def test_digits_train_and_test_are_tensor_datasets(digits: data.TrainTest) -> None:
    assert isinstance(digits.train, TensorDataset) and (len(digits.train), len(digits.test)) == (1348, 449)


def test_digits_partition_and_subset(digits: data.TrainTest) -> None:
    part = data.Partition(data.dirichlet(digits.y_train, 4, 0.5, seed=0))
    x, y = part.subset(digits.train, 0)[0]
    assert x.shape == (64,) and y.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seed=0, test_fraction=0.0), r"test_fraction must be a number in \(0, 1\); got 0.0"),
        (dict(seed=0, flatten="yes"), r"flatten must be a bool; got 'yes'"),
        (dict(seed=None), r"seed must be a non-negative int or a numpy.random.Generator; got None"),
    ],
    ids=["fraction", "flatten", "seed"],
)
def test_digits_refuse_bad_arguments(sklearn_datasets, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        data.load_digits(**kwargs)


# --- FedProx synthetic -------------------------------------------------------------------------


def label_skew(clients: Clients, num_classes: int = 10) -> float:
    """Mean total-variation distance between each client's label mix and the pooled one."""
    counts = np.array([np.bincount(y.numpy(), minlength=num_classes) for _, y in clients], dtype=float)
    shares = counts / counts.sum(axis=1, keepdims=True)
    pooled = counts.sum(axis=0) / counts.sum()
    return float(0.5 * np.abs(shares - pooled).sum(axis=1).mean())


GENERATORS = {
    "synthetic": lambda seed, **kw: data.synthetic(12, 0.5, 0.5, seed=seed, **kw),
    "synthetic_iid": lambda seed, **kw: data.synthetic_iid(12, seed=seed, **kw),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_synthetic_shapes_and_dtypes(name: str) -> None:
    clients = GENERATORS[name](0, samples_per_client=list(range(50, 62)))
    assert [(x.shape, y.shape) for x, y in clients] == [((n, 60), (n,)) for n in range(50, 62)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in clients)


@pytest.mark.parametrize("name", GENERATORS)
def test_synthetic_labels_lie_in_range(name: str) -> None:
    y = torch.cat([y for _, y in GENERATORS[name](0)])
    assert 0 <= y.min().item() and y.max().item() < 10


@pytest.mark.parametrize("name", GENERATORS)
def test_synthetic_default_sizes_are_the_references_lognormal_plus_50(name: str) -> None:
    sizes = np.array([len(y) for _, y in GENERATORS[name](0)])
    expected = np.random.default_rng(0).lognormal(4.0, 2.0, 12).astype(np.int64) + 50
    assert sizes.tolist() == expected.tolist()


@pytest.mark.parametrize("name", GENERATORS)
def test_synthetic_same_seed_same_data(name: str) -> None:
    a, b = GENERATORS[name](3), GENERATORS[name](3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.mark.parametrize("name", GENERATORS)
def test_synthetic_different_seed_different_data(name: str) -> None:
    a, b = GENERATORS[name](3, samples_per_client=50), GENERATORS[name](4, samples_per_client=50)
    assert not any(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


def test_synthetic_dimensions_are_configurable() -> None:
    x, y = data.synthetic(3, 1.0, 1.0, seed=0, samples_per_client=40, num_features=7, num_classes=3)[2]
    assert x.shape == (40, 7) and y.max().item() < 3


def test_synthetic_clients_have_skewed_labels() -> None:
    assert label_skew(data.synthetic(20, 1.0, 1.0, seed=0, samples_per_client=500)) > 0.5


def test_synthetic_iid_clients_share_one_label_mix() -> None:
    assert label_skew(data.synthetic_iid(20, seed=0, samples_per_client=500)) < 0.1


def test_synthetic_with_alpha_and_beta_zero_still_gives_each_client_its_own_model() -> None:
    assert label_skew(data.synthetic(20, 0.0, 0.0, seed=0, samples_per_client=500)) > 0.5


def test_synthetic_iid_inputs_have_mean_zero_and_the_papers_variances() -> None:
    x = data.synthetic_iid(1, seed=0, samples_per_client=20_000)[0][0].numpy()
    expected = np.arange(1, 61, dtype=float) ** -1.2
    assert np.abs(x.mean(axis=0)).max() < 0.03 and np.allclose(x.var(axis=0), expected, rtol=0.05)


def test_synthetic_beta_spreads_the_clients_input_means() -> None:
    means = [x.numpy().mean() for x, _ in data.synthetic(20, 0.0, 1.0, seed=0, samples_per_client=500)]
    assert np.std(means) > 0.4


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: data.synthetic(0, 1.0, 1.0, seed=0), r"num_clients must be an int >= 1; got 0"),
        (lambda: data.synthetic(3, -1.0, 1.0, seed=0), r"alpha must be a finite number >= 0; got -1.0"),
        (lambda: data.synthetic(3, 1.0, float("nan"), seed=0), r"beta must be a finite number >= 0; got nan"),
        (lambda: data.synthetic(3, 1.0, 1.0, seed=None), r"seed must be .*got None"),
        (lambda: data.synthetic_iid(3, seed=0, num_features=0), r"num_features must be an int >= 1; got 0"),
        (lambda: data.synthetic_iid(3, seed=0, num_classes=1), r"num_classes must be an int >= 2; got 1"),
        (lambda: data.synthetic_iid(3, seed=0, samples_per_client=0), r"samples_per_client must be an int >= 1; got 0"),
        (lambda: data.synthetic_iid(3, seed=0, samples_per_client=[5, 5]), r"one size per client, 3; got 2"),
        (lambda: data.synthetic_iid(3, seed=0, samples_per_client=[5, 0, 5]), r"samples_per_client\[1\] must be an int >= 1; got 0"),
        (lambda: data.synthetic_iid(3, seed=0, samples_per_client="100"), r"None, an int, or a sequence of ints; got '100'"),
    ],
    ids=["clients", "alpha", "beta", "seed", "features", "classes", "size", "sizes-length", "sizes-item", "sizes-str"],
)
def test_synthetic_refuses_bad_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        call()
