"""Tests of openfl_api.aggregate, in one process, on small tensors with results worked by hand."""

from __future__ import annotations

import gc
import io
import weakref

import pytest
import torch
from torch.testing import assert_close

import openfl_api.aggregate as aggregate_module
from openfl_api.aggregate import (
    AverageAggregator,
    ElasticAggregator,
    NaiveAggregator,
    elastic_update,
    normalized_sensitivity,
)
from openfl_api.errors import ConfigurationError


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def bound(cls: type, *shapes: tuple[int, ...], **kwargs: object):
    """Returns a ``cls`` over zero parameters of ``shapes``, bound to the names w0, w1, ..."""
    agg = cls([torch.nn.Parameter(torch.zeros(shape)) for shape in shapes], **kwargs)
    agg.bind([f"w{i}" for i in range(len(shapes))])
    return agg


def test_all_names_are_exported() -> None:
    for name in aggregate_module.__all__:
        assert hasattr(aggregate_module, name), name


# --- FedAvg and the plain mean -------------------------------------------------------------


def test_fedavg_is_the_hand_computed_weighted_average() -> None:
    agg = bound(AverageAggregator, (2,))
    agg.add({"w0": t(1, 2)}, num_samples=1)
    agg.add({"w0": t(3, 4)}, num_samples=2)
    agg.add({"w0": t(5, 6)}, num_samples=5)
    # (1*1 + 2*3 + 5*5) / 8 = 32 / 8 and (1*2 + 2*4 + 5*6) / 8 = 40 / 8
    assert_close(agg.aggregate({"w0": t(0, 0)}), {"w0": t(4, 5)})


def test_fedavg_weight_multiplies_num_samples() -> None:
    agg = bound(AverageAggregator, (2,))
    agg.add({"w0": t(1, 2)}, num_samples=1, weight=3.0)
    agg.add({"w0": t(5, 6)}, num_samples=2, weight=0.5)
    # weights 3 and 1: (3*1 + 5) / 4, (3*2 + 6) / 4
    assert_close(agg.aggregate({"w0": t(0, 0)}), {"w0": t(2, 3)})


def test_naive_is_the_unweighted_mean() -> None:
    agg = bound(NaiveAggregator, (2,))
    agg.add({"w0": t(1, 2)}, num_samples=1)
    agg.add({"w0": t(3, 4)}, num_samples=2)
    agg.add({"w0": t(5, 6)}, num_samples=5)
    assert_close(agg.aggregate({"w0": t(0, 0)}), {"w0": t(3, 4)})


def test_naive_weight_multiplies() -> None:
    agg = bound(NaiveAggregator, (2,))
    agg.add({"w0": t(1, 2)}, num_samples=7, weight=3.0)
    agg.add({"w0": t(5, 6)}, num_samples=1, weight=1.0)
    assert_close(agg.aggregate({"w0": t(0, 0)}), {"w0": t(2, 3)})


def test_integer_buffer_is_rounded_to_nearest() -> None:
    agg = bound(AverageAggregator, (1,))
    agg.add({"w0": t(0), "bn.num_batches_tracked": t(10, 4, dtype=torch.int64)}, num_samples=1)
    agg.add({"w0": t(0), "bn.num_batches_tracked": t(11, 0, dtype=torch.int64)}, num_samples=2)
    result = agg.aggregate({"w0": t(0), "bn.num_batches_tracked": t(0, 0, dtype=torch.int64)})
    # 32 / 3 = 10.67 -> 11 and 4 / 3 = 1.33 -> 1
    assert_close(result["bn.num_batches_tracked"], t(11, 1, dtype=torch.int64))


def test_bool_buffer_takes_the_weighted_majority_and_a_tie_is_true() -> None:
    agg = bound(AverageAggregator, (1,))
    for mask, num_samples in [((1, 0, 1), 1), ((0, 0, 1), 2), ((1, 1, 0), 1)]:
        agg.add({"w0": t(0), "mask": t(*mask, dtype=torch.bool)}, num_samples=num_samples)
    result = agg.aggregate({"w0": t(0), "mask": t(0, 0, 0, dtype=torch.bool)})
    # weighted means 2/4 (tie), 1/4, 3/4
    assert_close(result["mask"], t(1, 0, 1, dtype=torch.bool))


def test_float16_entries_are_summed_without_overflow() -> None:
    agg = bound(NaiveAggregator, (1,))
    big = t(40000, dtype=torch.float16)  # twice this overflows float16 (max 65504)
    agg.add({"w0": big}, num_samples=1)
    agg.add({"w0": big}, num_samples=1)
    assert_close(agg.aggregate({"w0": t(0, dtype=torch.float16)}), {"w0": big})


def test_optim_entries_are_averaged_in_the_dtype_they_came_in() -> None:
    agg = bound(AverageAggregator, (1,), state_keys=("momentum_buffer",))
    agg.add({"w0": t(0), "optim/momentum_buffer/w0": t(1, dtype=torch.float64)}, num_samples=1)
    agg.add({"w0": t(0), "optim/momentum_buffer/w0": t(4, dtype=torch.float64)}, num_samples=2)
    result = agg.aggregate({"w0": t(0)})
    assert_close(result["optim/momentum_buffer/w0"], t(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype, acc_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float64),
                                              (torch.bfloat16, torch.float32), (torch.complex64, torch.complex128)])
def test_a_large_mean_has_the_bits_of_one_division_rounded_once(dtype: torch.dtype, acc_dtype: torch.dtype) -> None:
    # Past a few hundred thousand elements finish_mean divides a chunk at a time: the same bits
    # as torch's division into the result's dtype, over a size that leaves a partial last chunk.
    generator = torch.Generator().manual_seed(0)
    acc = torch.randn(600_001, dtype=acc_dtype, generator=generator)
    if not acc_dtype.is_complex:
        acc *= torch.exp(torch.randn(600_001, dtype=acc_dtype, generator=generator) * 8)
    expected = torch.div(acc, 7.000000001, out=torch.empty(acc.shape, dtype=dtype))
    got = aggregate_module.functional.finish_mean(acc, 7.000000001, dtype)
    assert got.dtype == dtype and got.shape == acc.shape
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_count_and_total_weight_follow_adds_and_aggregate() -> None:
    agg = bound(AverageAggregator, (1,))
    agg.add({"w0": t(1)}, num_samples=2)
    agg.add({"w0": t(1)}, num_samples=3, weight=0.5)
    assert (agg.count, agg.total_weight) == (2, 3.5)
    agg.aggregate({"w0": t(0)})
    assert (agg.count, agg.total_weight) == (0, 0.0)


def test_reset_forgets_the_uploads() -> None:
    agg = bound(NaiveAggregator, (1,))
    agg.add({"w0": t(100)}, num_samples=1)
    agg.reset()
    agg.add({"w0": t(2)}, num_samples=1)
    assert_close(agg.aggregate({"w0": t(0)}), {"w0": t(2)})


# --- memory --------------------------------------------------------------------------------


def test_mutating_the_input_after_add_does_not_change_the_result() -> None:
    agg = bound(NaiveAggregator, (2,))
    received = t(1, 2)
    agg.add({"w0": received}, num_samples=1)
    received.fill_(100)  # the receive buffer is reused for the next upload
    assert_close(agg.aggregate({"w0": t(0, 0)}), {"w0": t(1, 2)})


def test_add_keeps_no_reference_to_the_input() -> None:
    agg = bound(NaiveAggregator, (2,))
    received = t(1, 2)
    ref = weakref.ref(received)
    agg.add({"w0": received}, num_samples=1)
    del received
    gc.collect()
    assert ref() is None


def test_second_round_does_not_see_the_first_rounds_uploads() -> None:
    agg = bound(NaiveAggregator, (2,))
    agg.add({"w0": t(100, 100)}, num_samples=1)
    agg.aggregate({"w0": t(0, 0)})
    agg.add({"w0": t(1, 2)}, num_samples=1)
    assert_close(agg.aggregate({"w0": t(0, 0)}), {"w0": t(1, 2)})


def _level_buffers(agg) -> list:
    return list(agg._sum._levels.sums.values())


def test_buffers_are_reused_across_rounds() -> None:
    agg = bound(AverageAggregator, (2,))
    agg.add({"w0": t(1, 2)}, num_samples=1)
    first = [b.ctypes.data for b in _level_buffers(agg)]
    agg.aggregate({"w0": t(0, 0)})
    agg.add({"w0": t(3, 3.5)}, num_samples=1)  # the same level: |x| < 2**8
    assert [b.ctypes.data for b in _level_buffers(agg)] == first


def test_memory_does_not_grow_with_the_number_of_adds() -> None:
    def held_bytes(agg: AverageAggregator) -> int:
        return sum(b.nbytes for b in _level_buffers(agg))

    agg = bound(AverageAggregator, (64,))
    agg.add({"w0": torch.ones(64)}, num_samples=1)
    after_one = held_bytes(agg)
    for _ in range(100):
        agg.add({"w0": torch.ones(64)}, num_samples=1)
    assert held_bytes(agg) == after_one == 64 * 8  # one int64 sum per level in use


def test_aggregate_returns_fresh_tensors() -> None:
    agg = bound(NaiveAggregator, (2,))
    agg.add({"w0": t(1, 2)}, num_samples=1)
    result = agg.aggregate({"w0": t(0, 0)})
    agg.add({"w0": t(7, 7)}, num_samples=1)
    assert_close(result, {"w0": t(1, 2)})


def test_state_dict_round_trip_mid_round_gives_the_same_aggregate() -> None:
    uploads = [
        ({"w0": t(1, 2), "n": t(3, dtype=torch.int64)}, 1),
        ({"w0": t(3, 4), "n": t(5, dtype=torch.int64)}, 2),
    ]
    current = {"w0": t(0, 0), "n": t(0, dtype=torch.int64)}
    uninterrupted = bound(AverageAggregator, (2,))
    interrupted = bound(AverageAggregator, (2,))
    for tensors, num_samples in uploads:
        uninterrupted.add(tensors, num_samples)
    interrupted.add(*uploads[0])
    file = io.BytesIO()
    torch.save(interrupted.state_dict(), file)
    file.seek(0)
    resumed = bound(AverageAggregator, (2,))
    resumed.load_state_dict(torch.load(file, weights_only=True))
    resumed.add(*uploads[1])
    assert (resumed.count, resumed.total_weight) == (2, 3.0)
    assert_close(resumed.aggregate(current), uninterrupted.aggregate(current))


# --- Elastic Aggregation -------------------------------------------------------------------


def elastic_upload(
    w0: torch.Tensor, s0: torch.Tensor, **more: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {"w0": w0, "extra/sensitivity/w0": s0, **more}


def test_elastic_with_tau_0_and_uniform_sensitivity_keeps_the_current_value() -> None:
    agg = bound(ElasticAggregator, (2,), tau=0.0)
    agg.add(elastic_upload(t(5, 6), t(2, 2)), num_samples=1)
    agg.add(elastic_upload(t(7, 8), t(2, 2)), num_samples=3)
    # zeta = 1 everywhere, so the factor 1 + 0 - 1 is 0
    assert_close(agg.aggregate({"w0": t(1, 1)})["w0"], t(1, 1))


def test_elastic_with_tau_0_and_zero_sensitivity_is_fedavg() -> None:
    agg = bound(ElasticAggregator, (2,), tau=0.0)
    agg.add(elastic_upload(t(1, 2), t(0, 0)), num_samples=1)
    agg.add(elastic_upload(t(5, 6), t(0, 0)), num_samples=3)
    # zeta = 0 (max is 0), factor 1: the FedAvg average (1 + 15) / 4, (2 + 18) / 4
    assert_close(agg.aggregate({"w0": t(9, 9)})["w0"], t(4, 5))


def test_elastic_with_tau_1_and_zero_sensitivity_doubles_the_step() -> None:
    agg = bound(ElasticAggregator, (2,), tau=1.0)
    agg.add(elastic_upload(t(3, 5), t(0, 0)), num_samples=1)
    # factor 2: 1 - 2 * (1 - 3), 1 - 2 * (1 - 5)
    assert_close(agg.aggregate({"w0": t(1, 1)})["w0"], t(5, 9))


def test_elastic_matches_a_hand_computed_two_parameter_case() -> None:
    agg = bound(ElasticAggregator, (2,), (2,), tau=0.5)
    s0, s1 = "extra/sensitivity/w0", "extra/sensitivity/w1"
    agg.add({"w0": t(3, 1), "w1": t(2, 2), s0: t(1, 0), s1: t(2, 2)}, num_samples=1)
    agg.add({"w0": t(3, 5), "w1": t(2, 6), s0: t(1, 4), s1: t(2, 2)}, num_samples=3)
    result = agg.aggregate({"w0": t(1, 1), "w1": t(0, 2)})
    # w0: average (3, 4), sensitivity (1, 3), zeta (1/3, 1), factor (7/6, 1/2)
    #     1 - 7/6 * (1 - 3) = 10/3 and 1 - 1/2 * (1 - 4) = 5/2
    # w1: average (2, 5), sensitivity (2, 2), zeta (1, 1), factor (1/2, 1/2)
    #     0 - 1/2 * (0 - 2) = 1 and 2 - 1/2 * (2 - 5) = 7/2
    assert_close(result["w0"], t(10 / 3, 5 / 2))
    assert_close(result["w1"], t(1, 7 / 2))


def test_elastic_averages_buffers_optim_and_extra_entries_with_fedavg_weights() -> None:
    agg = bound(ElasticAggregator, (1,), tau=0.0, state_keys=("momentum_buffer",))
    agg.add(elastic_upload(t(0), t(1), **{"bn.mean": t(1), "optim/momentum_buffer/w0": t(2)}), 1)
    agg.add(elastic_upload(t(0), t(5), **{"bn.mean": t(5), "optim/momentum_buffer/w0": t(6)}), 3)
    result = agg.aggregate({"w0": t(0), "bn.mean": t(0)})
    expected = {"bn.mean": t(4), "optim/momentum_buffer/w0": t(5), "extra/sensitivity/w0": t(4)}
    assert_close({name: result[name] for name in expected}, expected)


def test_track_accumulates_the_sensitivity_with_momentum() -> None:
    w = torch.nn.Parameter(t(-2))
    agg = ElasticAggregator([w], momentum=0.5)
    agg.bind(["w"])
    agg.track(w * t(1, 3))  # ||output||^2 = w^2 * 10, gradient 20 w = -40
    agg.track(w * t(1))  # gradient 2 w = -4
    # 0.5 * (0.5 * 0 + 0.5 * 40) + 0.5 * 4 = 12
    assert_close(agg.frontend_extras(), {"extra/sensitivity/w": t(12)})


def test_track_does_not_touch_grad() -> None:
    w = torch.nn.Parameter(t(-2))
    agg = ElasticAggregator([w])
    agg.track(w * t(1, 3))
    assert w.grad is None


def test_track_keeps_the_graph_for_backward() -> None:
    w = torch.nn.Parameter(t(-2))
    agg = ElasticAggregator([w])
    output = w * t(1, 3)
    agg.track(output)
    output.sum().backward()
    assert_close(w.grad, t(4))


def test_track_gives_frozen_and_unused_parameters_zero_sensitivity() -> None:
    used, unused, frozen = torch.nn.Parameter(t(1)), torch.nn.Parameter(t(1)), t(1)
    agg = ElasticAggregator([used, unused, frozen], momentum=0.0)
    agg.bind(["used", "unused", "frozen"])
    agg.track(used * frozen * t(3))  # gradient of 9 used^2 frozen^2 is 18 used frozen^2 = 18
    expected = {
        "extra/sensitivity/used": t(18),
        "extra/sensitivity/unused": t(0),
        "extra/sensitivity/frozen": t(0),
    }
    assert_close(agg.frontend_extras(), expected)


def test_frontend_extras_names_every_parameter_and_is_zero_when_untracked() -> None:
    agg = bound(ElasticAggregator, (2,), (1,))
    expected = {"extra/sensitivity/w0": t(0, 0), "extra/sensitivity/w1": t(0)}
    assert_close(agg.frontend_extras(), expected)


def test_frontend_extras_restarts_tracking() -> None:
    w = torch.nn.Parameter(t(1))
    agg = ElasticAggregator([w])
    agg.bind(["w"])
    agg.track(w * t(1))
    agg.frontend_extras()
    assert_close(agg.frontend_extras(), {"extra/sensitivity/w": t(0)})


def test_average_and_naive_upload_no_extras() -> None:
    assert bound(AverageAggregator, (1,)).frontend_extras() == {}
    assert bound(NaiveAggregator, (1,)).frontend_extras() == {}


def test_normalized_sensitivity_divides_by_the_max_or_gives_zeros() -> None:
    assert_close(normalized_sensitivity(t(1, 4, 2)), t(0.25, 1, 0.5))
    assert_close(normalized_sensitivity(t(0, 0)), t(0, 0))


def test_elastic_update_is_the_papers_formula() -> None:
    # zeta (0, 1), tau 0.25: factors (1.25, 0.25) on current - average = (4, 4)
    assert_close(elastic_update(t(4, 4), t(0, 0), t(0, 2), tau=0.25), t(-1, 3))


# --- argument validation -------------------------------------------------------------------


def test_empty_params_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="params must hold at least one tensor"):
        AverageAggregator(iter([]))


def test_non_tensor_params_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="item 1 is a float"):
        AverageAggregator([torch.zeros(1), 1.0])


@pytest.mark.parametrize("state_keys", [("",), ("a/b",), (3,), ("m", "m")])
def test_bad_state_keys_are_refused(state_keys: tuple) -> None:
    with pytest.raises(ConfigurationError, match="state_keys"):
        AverageAggregator([torch.zeros(1)], state_keys=state_keys)


def test_a_bare_str_state_keys_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"not the str 'momentum_buffer'; wrap it"):
        AverageAggregator([torch.zeros(1)], state_keys="momentum_buffer")


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan"), True])
def test_bad_tau_is_refused(tau: float) -> None:
    with pytest.raises(ConfigurationError, match=r"tau must be a number in \[0, 1\]"):
        ElasticAggregator([torch.zeros(1)], tau=tau)


@pytest.mark.parametrize("momentum", [-0.1, 1.0])
def test_bad_momentum_is_refused(momentum: float) -> None:
    with pytest.raises(ConfigurationError, match=r"momentum must be a number in \[0, 1\)"):
        ElasticAggregator([torch.zeros(1)], momentum=momentum)


def test_bind_needs_one_name_per_parameter() -> None:
    agg = AverageAggregator([torch.zeros(1), torch.zeros(1)])
    with pytest.raises(ConfigurationError, match="2 parameters, 1 names"):
        agg.bind(["w0"])


def test_bind_needs_distinct_names() -> None:
    agg = AverageAggregator([torch.zeros(1), torch.zeros(1)])
    with pytest.raises(ConfigurationError, match="must be distinct"):
        agg.bind(["w", "w"])


def test_param_names_before_bind_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"call bind\(names\)"):
        AverageAggregator([torch.zeros(1)]).param_names


def test_add_before_bind_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"call bind\(names\)"):
        AverageAggregator([torch.zeros(1)]).add({"w0": t(1)}, num_samples=1)


def test_aggregate_with_nothing_added_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="aggregate.. needs at least one upload"):
        bound(AverageAggregator, (1,)).aggregate({"w0": t(0)})


def test_aggregate_with_zero_total_weight_is_refused() -> None:
    agg = bound(AverageAggregator, (1,))
    agg.add({"w0": t(1)}, num_samples=0)
    with pytest.raises(ConfigurationError, match="needs a positive total weight"):
        agg.aggregate({"w0": t(0)})


def test_aggregate_needs_every_model_entry_in_current() -> None:
    agg = bound(AverageAggregator, (1,))
    agg.add({"w0": t(1), "bn.mean": t(1)}, num_samples=1)
    with pytest.raises(ConfigurationError, match="current has no entry 'bn.mean'"):
        agg.aggregate({"w0": t(0)})


@pytest.mark.parametrize(
    "name", ["optim/exp_avg/w0", "optim/momentum_buffer/nope", "extra/sensitivity/w0", "w0/x"]
)
def test_add_refuses_an_unknown_entry_name(name: str) -> None:
    agg = bound(AverageAggregator, (1,), state_keys=("momentum_buffer",))
    upload = {"w0": t(1), "optim/momentum_buffer/w0": t(1), name: t(1)}
    with pytest.raises(ConfigurationError, match=f"unknown entry '{name}'"):
        agg.add(upload, num_samples=1)


def test_add_refuses_an_entry_the_rounds_first_upload_lacked() -> None:
    agg = bound(AverageAggregator, (1,))
    agg.add({"w0": t(1)}, num_samples=1)
    with pytest.raises(ConfigurationError, match="unknown entry 'bn.mean'"):
        agg.add({"w0": t(1), "bn.mean": t(1)}, num_samples=1)


def test_a_refused_upload_accumulates_nothing() -> None:
    agg = bound(NaiveAggregator, (1,))
    agg.add({"w0": t(1)}, num_samples=1)
    with pytest.raises(ConfigurationError, match="unknown entry 'bn.mean'"):
        agg.add({"w0": t(100), "bn.mean": t(1)}, num_samples=1)
    assert_close(agg.aggregate({"w0": t(0)}), {"w0": t(1)})


def test_add_refuses_an_upload_without_a_parameter() -> None:
    agg = bound(ElasticAggregator, (1,))
    with pytest.raises(ConfigurationError, match=r"lacks entries \['extra/sensitivity/w0'\]"):
        agg.add({"w0": t(1)}, num_samples=1)


def test_add_refuses_a_shape_change_within_a_round() -> None:
    agg = bound(AverageAggregator, (2,))
    agg.add({"w0": t(1, 2)}, num_samples=1)
    with pytest.raises(ConfigurationError, match=r"entry 'w0' came as torch.float32 \(3,\)"):
        agg.add({"w0": t(1, 2, 3)}, num_samples=1)


@pytest.mark.parametrize("num_samples", [-1, 1.5, True])
def test_add_refuses_a_bad_num_samples(num_samples: int) -> None:
    with pytest.raises(ConfigurationError, match="num_samples must be an int >= 0"):
        bound(AverageAggregator, (1,)).add({"w0": t(1)}, num_samples=num_samples)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_add_refuses_a_bad_weight(weight: float) -> None:
    with pytest.raises(ConfigurationError, match="weight must be a finite number >= 0"):
        bound(AverageAggregator, (1,)).add({"w0": t(1)}, num_samples=1, weight=weight)


def test_load_state_dict_refuses_a_foreign_dict() -> None:
    with pytest.raises(ConfigurationError, match="state must be a dict with keys"):
        bound(AverageAggregator, (1,)).load_state_dict({"count": 0})


def test_track_refuses_an_output_without_grad() -> None:
    w = torch.nn.Parameter(t(1))
    agg = ElasticAggregator([w])
    with torch.no_grad():
        output = w * 2
    with pytest.raises(ConfigurationError, match="a tensor that requires grad"):
        agg.track(output)
