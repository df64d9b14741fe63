"""The order-free sum (openfl_api.aggregate.exact): the same bits for every order of three or more
adds, within the documented bound of the exact sum, for every dtype an entry can have."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openfl_api.aggregate import AverageAggregator, ExactSum
from openfl_api.aggregate import exact as exact_module


def _one(x: torch.Tensor) -> ExactSum:
    """An exact sum of tensors like ``x``."""
    return ExactSum([tuple(x.shape)], floating=[x.is_floating_point() or x.is_complex()], complex_=[x.is_complex()])


def _sum(terms, order):
    total = _one(terms[0][0])
    for index in order:
        x, weight = terms[index]
        total.add_([x], weight)
    return total.value()[0]


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.numpy().tobytes()


def test_every_order_of_six_uploads_gives_the_same_bits_where_float32_does_not() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4096, generator=generator) * 0.05
    terms = [(base + 0.01 * torch.randn(4096, generator=generator), float(k + 1)) for k in range(6)]
    orders = list(itertools.permutations(range(6)))[::37]
    assert len({_bits(_sum(terms, order)) for order in orders}) == 1
    float32 = set()
    for order in orders:
        acc = torch.zeros(4096)
        for index in order:
            acc.add_(terms[index][0], alpha=terms[index][1])
        float32.add(_bits(acc))
    assert len(float32) > 1  # the problem the exact sum solves


def test_three_terms_that_cancel_sum_exactly_in_any_order() -> None:
    terms = [(torch.tensor([2.0**30]), 1.0), (torch.tensor([2.0**-30]), 1.0), (torch.tensor([-(2.0**30)]), 1.0)]
    results = {float(_sum(terms, order)) for order in itertools.permutations(range(3))}
    assert results == {2.0**-30}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.floats(-1e6, 1e6, width=32), min_size=3, max_size=3),
                          st.floats(0.001, 1000.0)), min_size=3, max_size=5),
       st.randoms(use_true_random=False))
def test_any_terms_in_any_two_orders_give_the_same_bits(raw, rng) -> None:
    terms = [(torch.tensor(values, dtype=torch.float32), weight) for values, weight in raw]
    order = list(range(len(terms)))
    shuffled = order[:]
    rng.shuffle(shuffled)
    assert _bits(_sum(terms, order)) == _bits(_sum(terms, shuffled))


def test_the_sum_is_within_the_documented_bound_of_the_exact_sum() -> None:
    generator = torch.Generator().manual_seed(1)
    terms = [(torch.randn(257, generator=generator) * scale, weight)
             for scale, weight in ((1.0, 3.0), (1e-3, 7.0), (50.0, 0.5), (2.0, 11.0))]
    value = _sum(terms, range(len(terms)))
    for i in range(257):
        exact = sum(Fraction(float(x[i])) * Fraction(w) for x, w in terms)
        bound = sum(2.0**-34 * float(x.abs().max()) * w + 2.0**-52 * abs(float(x[i]) * w) for x, w in terms)
        assert abs(Fraction(float(value[i])) - exact) <= Fraction(bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
                                   torch.int32, torch.uint8, torch.bool])
def test_every_real_dtype_sums_like_float64_of_its_values(dtype) -> None:
    values = [torch.tensor([1, 0, 3], dtype=dtype), torch.tensor([2, 1, 0], dtype=dtype),
              torch.tensor([0, 1, 1], dtype=dtype)]
    total = _one(values[0])
    for x in values:
        total.add_([x], 2.0)
    expected = sum(x.to(torch.float64) * 2.0 for x in values)
    assert torch.equal(total.value()[0], expected)


def test_complex_entries_come_back_as_pairs_of_reals() -> None:
    x = torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64)
    total = _one(x)
    for _ in range(3):
        total.add_([x], 1.0)
    assert torch.equal(torch.view_as_complex(total.value()[0]), torch.tensor([3 + 6j, -1.5j], dtype=torch.complex128))


def test_state_dict_round_trips_a_sum_in_progress_exactly() -> None:
    generator = torch.Generator().manual_seed(2)
    xs = [torch.randn(64, generator=generator) * 10.0 ** k for k in range(-3, 3)]
    first, second = _one(xs[0]), _one(xs[0])
    for x in xs[:3]:
        first.add_([x], 1.5)
    second.load_state_dict(first.state_dict())
    for x in xs[3:]:
        first.add_([x], 1.5)
        second.add_([x], 1.5)
    assert _bits(first.value()[0]) == _bits(second.value()[0])


def test_too_many_terms_of_one_magnitude_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(exact_module, "MAX_TERMS", 3)
    total = _one(torch.ones(1))
    for _ in range(3):
        total.add_([torch.ones(1)], 1.0)
    with pytest.raises(OverflowError, match="at most 3 terms of one magnitude"):
        total.add_([torch.ones(1)], 1.0)


def test_tensors_of_one_upload_keep_their_own_levels_and_counters_do_not_coarsen_the_weights() -> None:
    # A tiny tensor beside a large one, and an integer counter beside floats: each is rounded to
    # its own level's grid, so each is exact here (the values sit on grids far coarser than 2**-42).
    tensors = [torch.tensor([3.0e4, -1.5e4]), torch.tensor([2.0**-20, 3 * 2.0**-21]), torch.tensor(123456789)]
    total = ExactSum([(2,), (2,), ()], floating=[True, True, False])
    for _ in range(3):
        total.add_(tensors, 1.0)
    sums = total.value()
    for got, x in zip(sums, tensors):
        assert torch.equal(got, x.to(torch.float64) * 3)


def test_a_sum_of_several_levels_reads_back_as_each_levels_integer_times_its_grid_added_from_the_lowest() -> None:
    # Tensors whose magnitudes span several levels, over more elements than one chunk of a pass:
    # value() is, element by element, float64(integer sum of level L) * 2**(8L - 42) added in
    # ascending L, whatever the chunking inside.
    generator = torch.Generator().manual_seed(5)
    size = 3 * exact_module._CHUNK + 7
    scales = [2.0**-30, 1.0, 2.0**20]
    tensors = [torch.randn(size, generator=generator) * scale for scale in scales]
    total = ExactSum([(size,)] * 3)
    for weight in (1.0, 0.3, 7.0):
        total.add_(tensors, weight)
    levels = total.segments()[0]
    assert len(levels) >= 3
    expected = None
    for level in sorted(levels):
        integers, _ = levels[level]
        part = integers.astype("float64") * 2.0 ** (exact_module.LEVEL_BITS * level - exact_module.GRID_BITS)
        expected = part if expected is None else expected + part
    got = torch.cat(total.value()).numpy()
    assert got.tobytes() == expected.tobytes()


def test_fedavg_of_three_or_more_uploads_does_not_depend_on_their_order() -> None:
    generator = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(40, 30)), torch.nn.Parameter(torch.zeros(30))]
    uploads = [({"w": torch.randn(40, 30, generator=generator), "b": torch.randn(30, generator=generator)}, n)
               for n in (3, 17, 5, 9)]
    results = set()
    for order in itertools.permutations(range(4)):
        agg = AverageAggregator(params)
        agg.bind(["w", "b"])
        for index in order:
            agg.add(*uploads[index])
        out = agg.aggregate({"w": params[0].detach(), "b": params[1].detach()})
        results.add(_bits(out["w"]) + _bits(out["b"]))
    assert len(results) == 1


def test_with_the_uploads_peak_every_order_gives_the_same_bits() -> None:
    generator = torch.Generator().manual_seed(4)
    uploads = [[torch.randn(300, generator=generator), torch.randn(7, generator=generator) * 1e-3]
               for _ in range(4)]
    results = set()
    for order in itertools.permutations(range(4)):
        total = ExactSum([(300,), (7,)])
        for index in order:
            tensors = uploads[index]
            total.add_(tensors, 2.0 + index, peak=max(float(t.abs().max()) for t in tensors))
        results.add(b"".join(_bits(v) for v in total.value()))
    assert len(results) == 1


def test_the_memory_of_a_sum_does_not_grow_with_the_number_of_uploads() -> None:
    generator = torch.Generator().manual_seed(3)
    total = _one(torch.zeros(1000))

    def held_bytes() -> int:  # what the sum keeps between uploads is what its state_dict holds
        return sum(t.numel() * t.element_size() for t in _flat(total.state_dict()) if torch.is_tensor(t))

    for _ in range(3):
        total.add_([torch.randn(1000, generator=generator)], 1.0)
    after_three = held_bytes()
    assert after_three > 0
    for _ in range(300):
        total.add_([torch.randn(1000, generator=generator)], 1.0)
    assert held_bytes() == after_three


def _flat(state):
    if isinstance(state, dict):
        for value in state.values():
            yield from _flat(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _flat(value)
    else:
        yield state


def test_a_sum_read_into_its_kept_buffer_has_the_fresh_reads_bits_and_is_overwritten_by_the_next() -> None:
    generator = torch.Generator().manual_seed(4)
    shapes = [(700, 1000), (3,), ()]  # more than one chunk of the flat layout
    total = ExactSum(shapes)
    for scale in (1e-3, 1.0, 1e3):  # three levels
        total.add_([torch.randn(shape, generator=generator) * scale for shape in shapes], 0.5)
    fresh = total.value()
    kept = total.value(reuse=True)
    assert [_bits(t) for t in kept] == [_bits(t) for t in fresh]
    first = kept[0].clone()
    total.add_([torch.randn(shape, generator=generator) for shape in shapes], 1.0)
    again = total.value(reuse=True)
    assert again[0].data_ptr() == kept[0].data_ptr() and not torch.equal(kept[0], first)
    assert torch.equal(fresh[0], first)  # a fresh read is never overwritten


def test_an_aggregate_is_not_changed_by_the_next_aggregate() -> None:
    generator = torch.Generator().manual_seed(5)
    net = torch.nn.Linear(300, 200)
    aggregator = AverageAggregator(net.parameters())
    aggregator.bind(["weight", "bias"])
    results = []
    for _ in range(2):
        for _ in range(3):
            aggregator.add({"weight": torch.randn(200, 300, generator=generator),
                            "bias": torch.randn(200, generator=generator)}, num_samples=2)
        results.append(aggregator.aggregate(net.state_dict()))
        results.append({name: tensor.clone() for name, tensor in results[-1].items()})
    assert all(torch.equal(results[0][name], results[1][name]) for name in ("weight", "bias"))


def test_means_read_out_of_the_sums_have_the_bits_of_the_mean_of_the_value() -> None:
    # means() divides and rounds a chunk at a time; each tensor must get the bits finish_mean
    # gives the float64 value: several levels, every real dtype, tensors crossing chunk borders.
    from openfl_api.aggregate.functional import finish_mean

    generator = torch.Generator().manual_seed(7)
    size = exact_module._CHUNK + 5
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool, torch.float32]
    shapes = [(size,), (3, 7), (size // 3,), (2 * size,), (4,), (5,), (0,)]
    floating = [d.is_floating_point for d in dtypes]
    total = ExactSum(shapes, floating=floating)
    for weight in (1.0, 0.3, 7.0):
        tensors = []
        for shape, dtype in zip(shapes, dtypes):
            if dtype == torch.bool:
                tensors.append(torch.rand(shape, generator=generator) < 0.5)
            elif dtype == torch.int64:
                tensors.append(torch.randint(-1000, 1000, shape, generator=generator))
            else:
                scale = 2.0 ** float(torch.randint(-30, 10, (), generator=generator))
                tensors.append((torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype))
        total.add_(tensors, weight)
    got = total.means(8.3, dtypes)
    expected = [finish_mean(v, 8.3, d) for v, d in zip(total.value(), dtypes)]
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
