"""Tests of the partitioners in openfl_api.data.functional and of the Partition wrapper."""

from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from openfl_api import data
from openfl_api.errors import ConfigurationError

N = 6000
LABELS = np.random.default_rng(123).integers(0, 10, N)

PARTITIONERS: Dict[str, Callable[[object], List[np.ndarray]]] = {
    "iid": lambda seed: data.iid(N, 37, seed=seed),
    "dirichlet": lambda seed: data.dirichlet(LABELS, 37, 0.3, seed=seed),
    "dirichlet_tiny_alpha": lambda seed: data.dirichlet(LABELS, 37, 0.01, seed=seed),
    "shards": lambda seed: data.shards(LABELS, 37, 3, seed=seed),
    "labels_per_client": lambda seed: data.shards(LABELS, 37, labels_per_client=2, seed=seed),
    "lognormal": lambda seed: data.lognormal_quantity(N, 37, 1.5, seed=seed),
    "powerlaw": lambda seed: data.powerlaw_quantity(N, 37, 1.8, seed=seed),
}


def sizes(parts: List[np.ndarray]) -> np.ndarray:
    return np.array([len(part) for part in parts])


def same(a: List[np.ndarray], b: List[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def distinct_labels(parts: List[np.ndarray], labels: np.ndarray = LABELS) -> np.ndarray:
    return (data.label_counts(parts, labels) > 0).sum(axis=1)


# --- what every partitioner guarantees -----------------------------------------------------------


@pytest.mark.parametrize("name", PARTITIONERS)
def test_sizes_sum_to_n_and_there_is_one_part_per_client(name: str) -> None:
    parts = PARTITIONERS[name](0)
    assert (len(parts), sizes(parts).sum()) == (37, N)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_parts_are_disjoint_and_cover_every_index(name: str) -> None:
    flat = np.concatenate(PARTITIONERS[name](0))
    assert np.array_equal(np.sort(flat), np.arange(N))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_parts_are_sorted_int64_arrays(name: str) -> None:
    parts = PARTITIONERS[name](0)
    assert all(part.dtype == np.int64 and part.ndim == 1 and np.all(np.diff(part) > 0) for part in parts)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_every_client_is_non_empty_by_default(name: str) -> None:
    assert sizes(PARTITIONERS[name](0)).min() >= 1


@pytest.mark.parametrize("name", PARTITIONERS)
def test_the_same_seed_gives_the_same_partition(name: str) -> None:
    assert same(PARTITIONERS[name](7), PARTITIONERS[name](7))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_a_different_seed_gives_a_different_partition(name: str) -> None:
    assert not same(PARTITIONERS[name](7), PARTITIONERS[name](8))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_a_generator_seed_draws_from_that_generator(name: str) -> None:
    assert same(PARTITIONERS[name](np.random.default_rng(7)), PARTITIONERS[name](7))


@pytest.mark.parametrize(
    "call",
    [
        lambda: data.iid(9, 10, seed=0),
        lambda: data.dirichlet(LABELS[:9], 10, 0.5, seed=0),
        lambda: data.lognormal_quantity(9, 10, 1.0, seed=0),
        lambda: data.powerlaw_quantity(9, 10, 2.0, seed=0),
        lambda: data.shards(LABELS[:9], 10, 1, seed=0),
    ],
    ids=["iid", "dirichlet", "lognormal", "powerlaw", "shards"],
)
def test_more_clients_than_samples_is_refused(call: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError, match=r"9 samples|only 9 samples"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: data.iid(100, 10, seed=0, min_size=11),
        lambda: data.dirichlet(LABELS[:100], 10, 0.5, seed=0, min_size=11),
        lambda: data.lognormal_quantity(100, 10, 1.0, seed=0, min_size=11),
        lambda: data.powerlaw_quantity(100, 10, 2.0, seed=0, min_size=11),
    ],
    ids=["iid", "dirichlet", "lognormal", "powerlaw"],
)
def test_an_impossible_min_size_is_refused_with_the_fix(call: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError, match=r"100 samples cannot give 10 clients at least 11 each \(needs 110\).*min_size=0"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: data.iid(N, 37, seed=0, min_size=100),
        lambda: data.dirichlet(LABELS, 37, 0.01, seed=0, min_size=100),
        lambda: data.lognormal_quantity(N, 37, 3.0, seed=0, min_size=100),
        lambda: data.powerlaw_quantity(N, 37, 1.2, seed=0, min_size=100),
    ],
    ids=["iid", "dirichlet", "lognormal", "powerlaw"],
)
def test_min_size_is_honoured(call: Callable[[], List[np.ndarray]]) -> None:
    assert sizes(call()).min() >= 100


def test_min_size_zero_allows_empty_clients() -> None:
    assert sizes(data.iid(3, 5, seed=0, min_size=0)).tolist() == [1, 1, 1, 0, 0]


# --- IID ---------------------------------------------------------------------------------------


def test_iid_sizes_are_balanced() -> None:
    assert sizes(data.iid(1003, 10, seed=0)).tolist() == [101, 101, 101] + [100] * 7


def test_iid_parts_are_spread_over_the_whole_range() -> None:
    parts = data.iid(10_000, 4, seed=0)
    assert all(part.min() < 100 and part.max() > 9_900 for part in parts)


# --- Dirichlet ---------------------------------------------------------------------------------


def test_dirichlet_with_alpha_001_on_60000_labels_and_100_clients_finishes() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 60_000)
    parts = data.dirichlet(labels, 100, 0.01, seed=0)
    assert (len(parts), sizes(parts).sum(), sizes(parts).min()) == (100, 60_000, 1)


def test_dirichlet_with_tiny_alpha_and_a_large_min_size_finishes() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 60_000)
    assert sizes(data.dirichlet(labels, 500, 1e-4, seed=0, min_size=100)).min() == 100


def test_dirichlet_with_small_alpha_gives_each_client_few_labels() -> None:
    parts = data.dirichlet(LABELS, 37, 0.01, seed=0)
    assert np.median(distinct_labels(parts)) == 1


def test_dirichlet_with_large_alpha_is_close_to_the_global_label_mix() -> None:
    parts = data.dirichlet(LABELS, 5, 1000.0, seed=0)
    shares = data.label_counts(parts, LABELS) / sizes(parts)[:, None]
    assert np.abs(shares - np.bincount(LABELS) / N).max() < 0.02


def test_dirichlet_depends_on_the_order_of_label_values_only() -> None:
    relabelled = LABELS * 7 - 30
    assert same(data.dirichlet(relabelled, 10, 0.5, seed=3), data.dirichlet(LABELS, 10, 0.5, seed=3))


@pytest.mark.parametrize("convert", [torch.from_numpy, list], ids=["tensor", "list"])
def test_dirichlet_takes_labels_as_tensors_and_lists(convert: Callable[[np.ndarray], object]) -> None:
    assert same(data.dirichlet(convert(LABELS), 10, 0.5, seed=3), data.dirichlet(LABELS, 10, 0.5, seed=3))


def test_dirichlet_with_one_label_is_a_size_split() -> None:
    parts = data.dirichlet(np.zeros(100, dtype=int), 4, 1.0, seed=0)
    assert sizes(parts).sum() == 100 and sizes(parts).min() >= 1


# --- shards and labels per client --------------------------------------------------------------


@pytest.mark.parametrize("per_client", [1, 2, 3, 10])
def test_labels_per_client_gives_exactly_that_many_labels(per_client: int) -> None:
    parts = data.shards(LABELS, 37, labels_per_client=per_client, seed=0)
    assert set(distinct_labels(parts).tolist()) == {per_client}


def test_labels_per_client_covers_every_label_with_fewer_clients_than_labels() -> None:
    parts = data.shards(LABELS, 3, labels_per_client=4, seed=0)
    assert set(distinct_labels(parts).tolist()) == {4} and sizes(parts).sum() == N


def test_labels_per_client_deals_labels_to_balanced_numbers_of_clients() -> None:
    holders = (data.label_counts(data.shards(LABELS, 37, labels_per_client=2, seed=0), LABELS) > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1


def test_labels_per_client_splits_a_label_evenly_among_its_holders() -> None:
    counts = data.label_counts(data.shards(LABELS, 37, labels_per_client=2, seed=0), LABELS)
    for column in counts.T:
        held = column[column > 0]
        assert held.max() - held.min() <= 1


def test_labels_per_client_gives_different_clients_different_label_sets() -> None:
    counts = data.label_counts(data.shards(LABELS, 37, labels_per_client=2, seed=0), LABELS)
    assert len({tuple(np.flatnonzero(row)) for row in counts}) > 10


def test_shards_cut_sorted_labels_into_single_label_shards() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 600))  # 200 shards of 30
    counts = data.label_counts(data.shards(labels, 100, 2, seed=0), labels)
    assert np.all(counts % 30 == 0) and np.all(counts.sum(axis=1) == 60)


def test_shards_default_to_two_per_client() -> None:
    assert same(data.shards(LABELS, 37, seed=5), data.shards(LABELS, 37, 2, seed=5))


def test_shards_hold_few_labels_per_client() -> None:
    assert distinct_labels(data.shards(LABELS, 100, 2, seed=0)).max() <= 4


def test_shards_refuse_both_counts() -> None:
    with pytest.raises(ConfigurationError, match="shards_per_client or labels_per_client, not both"):
        data.shards(LABELS, 10, 2, labels_per_client=2, seed=0)


def test_shards_refuse_more_labels_per_client_than_labels() -> None:
    with pytest.raises(ConfigurationError, match=r"at most the number of distinct labels, 10; got 11"):
        data.shards(LABELS, 10, labels_per_client=11, seed=0)


def test_labels_per_client_refuses_too_few_clients_to_hold_every_label() -> None:
    with pytest.raises(ConfigurationError, match=r"3 clients x 3 labels each cannot hold all 10 labels"):
        data.shards(LABELS, 3, labels_per_client=3, seed=0)


def test_labels_per_client_refuses_a_label_rarer_than_its_holders() -> None:
    labels = np.array([0] * 50 + [1] * 50 + [2])
    with pytest.raises(ConfigurationError, match=r"label 2 has 1 samples but is dealt to \d+ clients"):
        data.shards(labels, 10, labels_per_client=2, seed=0)


# --- quantity skew -----------------------------------------------------------------------------


def test_lognormal_sizes_have_a_log_std_near_sigma() -> None:
    log_sizes = np.log(sizes(data.lognormal_quantity(1_000_000, 2000, 1.0, seed=0)))
    assert abs(log_sizes.std() - 1.0) < 0.05


def test_lognormal_with_sigma_zero_is_balanced() -> None:
    assert sizes(data.lognormal_quantity(1003, 10, 0.0, seed=0)).tolist() == [101, 101, 101] + [100] * 7


def test_powerlaw_sizes_have_the_tail_index_of_the_exponent() -> None:
    s = sizes(data.powerlaw_quantity(1_000_000, 2000, 2.5, seed=0))
    hill = s.size / np.log(s / s.min()).sum()  # maximum-likelihood Pareto shape, expected 1.5
    assert abs(hill - 1.5) < 0.1


def test_powerlaw_with_a_smaller_exponent_is_more_concentrated() -> None:
    def top_share(exponent: float) -> float:
        s = np.sort(sizes(data.powerlaw_quantity(100_000, 1000, exponent, seed=0)))
        return s[-10:].sum() / s.sum()

    assert top_share(1.5) > top_share(3.0)


# --- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: data.iid(100, 10, seed=None), r"seed must be a non-negative int .*got None.*same int"),
        (lambda: data.iid(100, 10, seed=-1), r"seed must be .*got -1"),
        (lambda: data.iid(100, 10, seed="0"), r"seed must be .*got '0'"),
        (lambda: data.iid(100, 10, seed=True), r"seed must be .*got True"),
        (lambda: data.iid(0, 10, seed=0), r"n must be an int >= 1; got 0"),
        (lambda: data.iid(100.0, 10, seed=0), r"n must be an int >= 1; got 100.0"),
        (lambda: data.iid(100, 0, seed=0), r"num_clients must be an int >= 1; got 0"),
        (lambda: data.iid(100, 2.5, seed=0), r"num_clients must be an int >= 1; got 2.5"),
        (lambda: data.iid(100, 10, seed=0, min_size=-1), r"min_size must be an int >= 0; got -1"),
        (lambda: data.dirichlet(LABELS, 10, 0, seed=0), r"alpha must be a finite number > 0; got 0"),
        (lambda: data.dirichlet(LABELS, 10, -0.5, seed=0), r"alpha must be a finite number > 0; got -0.5"),
        (lambda: data.dirichlet(LABELS, 10, float("nan"), seed=0), r"alpha must be a finite number > 0; got nan"),
        (lambda: data.dirichlet(LABELS, 10, float("inf"), seed=0), r"alpha must be a finite number > 0; got inf"),
        (lambda: data.dirichlet(LABELS, 10, "0.5", seed=0), r"alpha must be a finite number > 0; got '0.5'"),
        (lambda: data.dirichlet(LABELS.astype(float), 10, 0.5, seed=0), r"labels must be integers; got dtype float64"),
        (lambda: data.dirichlet(LABELS.reshape(2, -1), 10, 0.5, seed=0), r"labels must be a non-empty 1-D .*\(2, 3000\)"),
        (lambda: data.dirichlet([], 10, 0.5, seed=0), r"labels must be a non-empty 1-D .*\(0,\)"),
        (lambda: data.lognormal_quantity(100, 10, -1.0, seed=0), r"sigma must be a finite number >= 0; got -1.0"),
        (lambda: data.powerlaw_quantity(100, 10, 1.0, seed=0), r"exponent must be a finite number > 1; got 1.0 .*normalised"),
        (lambda: data.shards(LABELS, 10, 0, seed=0), r"shards_per_client must be an int >= 1; got 0"),
        (lambda: data.shards(LABELS, 10, labels_per_client=0, seed=0), r"labels_per_client must be an int >= 1; got 0"),
    ],
    ids=[
        "seed-none", "seed-negative", "seed-str", "seed-bool", "n-zero", "n-float", "clients-zero",
        "clients-float", "min-size-negative", "alpha-zero", "alpha-negative", "alpha-nan", "alpha-inf",
        "alpha-str", "labels-float", "labels-2d", "labels-empty", "sigma-negative", "exponent-one",
        "shards-zero", "labels-per-client-zero",
    ],
)
def test_bad_arguments_are_refused_with_what_must_hold(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        call()


def test_a_bad_argument_can_be_caught_as_value_error() -> None:
    with pytest.raises(ValueError):
        data.iid(100, 0, seed=0)


# --- stratified split --------------------------------------------------------------------------


def test_stratified_split_is_disjoint_and_covers_every_index() -> None:
    train, test = data.stratified_split(LABELS, 0.25, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(N))


def test_stratified_split_has_the_asked_test_size() -> None:
    assert len(data.stratified_split(LABELS[:1001], 0.1, seed=0)[1]) == 100


def test_stratified_split_keeps_each_labels_share() -> None:
    _, test = data.stratified_split(LABELS, 0.3, seed=0)
    assert np.abs(np.bincount(LABELS[test], minlength=10) - 0.3 * np.bincount(LABELS)).max() < 1


def test_stratified_split_is_seeded() -> None:
    a, b, c = (data.stratified_split(LABELS, 0.3, seed=s)[1] for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, True, "0.2"])
def test_stratified_split_refuses_a_fraction_outside_0_1(fraction: object) -> None:
    with pytest.raises(ConfigurationError, match=r"test_fraction must be a number in \(0, 1\)"):
        data.stratified_split(LABELS, fraction, seed=0)


def test_stratified_split_refuses_a_fraction_that_leaves_a_side_empty() -> None:
    with pytest.raises(ConfigurationError, match=r"test_fraction=0.01 of 10 samples leaves the train or the test set empty"):
        data.stratified_split(LABELS[:10], 0.01, seed=0)


# --- label counts ------------------------------------------------------------------------------


def test_label_counts_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    counts = data.label_counts([np.array([0, 3]), np.array([1, 2, 4, 5])], labels)
    assert counts.tolist() == [[1, 0, 1], [0, 2, 2]]


def test_label_counts_pads_to_num_classes() -> None:
    assert data.label_counts([np.array([0, 1])], np.array([0, 1]), num_classes=4).tolist() == [[1, 1, 0, 0]]


def test_label_counts_refuses_labels_not_below_num_classes() -> None:
    with pytest.raises(ConfigurationError, match=r"below num_classes=2; got label 2 \(pass num_classes=3 or more\)"):
        data.label_counts([np.array([0, 1, 2])], np.array([0, 1, 2]), num_classes=2)


def test_label_counts_refuses_negative_labels() -> None:
    with pytest.raises(ConfigurationError, match=r"labels must be >= 0 to be counted; got -1"):
        data.label_counts([np.array([0, 1])], np.array([-1, 1]))


def test_label_counts_refuses_indices_outside_the_labels() -> None:
    with pytest.raises(ConfigurationError, match=r"client 1's indices must lie in range\(2\); got values from 1 to 5"):
        data.label_counts([np.array([0]), np.array([1, 5])], np.array([0, 1]))


def test_label_counts_refuses_float_indices() -> None:
    with pytest.raises(ConfigurationError, match=r"client 0's indices must be a 1-D integer array"):
        data.label_counts([np.array([0.0, 1.0])], np.array([0, 1]))


# --- the Partition wrapper ---------------------------------------------------------------------


@pytest.fixture
def part() -> data.Partition:
    return data.Partition(data.dirichlet(LABELS, 8, 0.5, seed=0))


def test_partition_exposes_clients_and_sizes(part: data.Partition) -> None:
    assert (part.num_clients, len(part), part.num_samples, part.sizes.sum()) == (8, 8, N, N)
    assert part.sizes.tolist() == [len(part[j]) for j in range(8)] == [len(p) for p in part.indices]


def test_partition_arrays_are_read_only(part: data.Partition) -> None:
    with pytest.raises(ValueError, match="read-only"):
        part[0][0] = 1


def test_partition_copies_what_it_is_given() -> None:
    parts = data.iid(10, 2, seed=0)
    part = data.Partition(parts)
    parts[0][0] = 9
    assert part[0][0] != 9


def test_partition_equality_compares_the_arrays() -> None:
    a = data.Partition(data.iid(100, 3, seed=0))
    assert a == data.Partition(data.iid(100, 3, seed=0)) and a != data.Partition(data.iid(100, 3, seed=1))


def test_partition_owners_inverts_the_indices(part: data.Partition) -> None:
    owners = part.owners()
    assert all(np.all(owners[part[j]] == j) for j in range(8))


def test_partition_label_counts(part: data.Partition) -> None:
    assert np.array_equal(part.label_counts(LABELS), data.label_counts(part.indices, LABELS))


def test_partition_repr_sums_up_sizes() -> None:
    assert repr(data.Partition(data.iid(10, 3, seed=0))) == "Partition(num_clients=3, num_samples=10, sizes min/median/max=3/3/4)"


def test_partition_slices_give_lists(part: data.Partition) -> None:
    assert isinstance(part[1:3], list) and len(part[1:3]) == 2


def test_partition_subset_takes_the_clients_samples() -> None:
    dataset = TensorDataset(torch.arange(10) * 10)
    part = data.Partition([np.array([1, 4]), np.array([0, 2, 3, 5, 6, 7, 8, 9])])
    subset = part.subset(dataset, 0)
    assert isinstance(subset, Subset) and [subset[i][0].item() for i in range(len(subset))] == [10, 40]


def test_partition_subsets_take_every_client(part: data.Partition) -> None:
    dataset = TensorDataset(torch.from_numpy(LABELS))
    subsets = part.subsets(dataset)
    assert [len(s) for s in subsets] == part.sizes.tolist()


def test_partition_subset_takes_numpy_client_ids(part: data.Partition) -> None:
    assert len(part.subset(TensorDataset(torch.from_numpy(LABELS)), np.int64(2))) == part.sizes[2]


@pytest.mark.parametrize("client", [-1, 8, 1.0, True])
def test_partition_subset_refuses_a_client_out_of_range(part: data.Partition, client: object) -> None:
    with pytest.raises(ConfigurationError, match=r"client must be an int in range\(8\)"):
        part.subset(TensorDataset(torch.from_numpy(LABELS)), client)


def test_partition_subset_refuses_a_dataset_of_another_size(part: data.Partition) -> None:
    with pytest.raises(ConfigurationError, match=rf"covers {N} samples but the dataset has 10"):
        part.subset(TensorDataset(torch.zeros(10)), 0)


def test_partition_refuses_labels_of_another_size(part: data.Partition) -> None:
    with pytest.raises(ConfigurationError, match=rf"one label per sample, {N}; got 10"):
        part.label_counts(LABELS[:10])


def test_partition_refuses_no_clients() -> None:
    with pytest.raises(ConfigurationError, match="at least one client"):
        data.Partition([])


def test_partition_refuses_a_repeated_index() -> None:
    with pytest.raises(ConfigurationError, match=r"exactly once; 1 indices are missing and 1 appear more than once"):
        data.Partition([np.array([0, 1]), np.array([1])])


def test_partition_refuses_a_missing_index() -> None:
    with pytest.raises(ConfigurationError, match=r"range\(4\) exactly once; 1 indices are missing"):
        data.Partition([np.array([0, 1]), np.array([3])], num_samples=4)


def test_partition_refuses_an_index_out_of_range() -> None:
    with pytest.raises(ConfigurationError, match=r"client 1's indices must lie in range\(3\)"):
        data.Partition([np.array([0, 1]), np.array([3])])
