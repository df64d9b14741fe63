"""Upload transforms through the API, in one process over memory:// pipes: the chain's rules, the
join check, DP-FedAvg (bit for bit at noise 0, the accountant's epsilon, StopAtEpsilon),
compression (real bytes) and secure aggregation (sync, FedBuff buffers, dropouts)."""

from __future__ import annotations

import math
import threading
import uuid
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch

import openfl_api as ofl
from openfl_api import aggregate
from openfl_api import transforms as T
from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.payload import Schema, decode, encode
from openfl_api.transforms.compress import _pack, _unpack
from openfl_api.transforms.layout import Layout
from openfl_api.transforms.secagg import Board, SecAggClient

from conftest import WAIT, fast_api, memory_address

D_IN, D_OUT = 6, 3


def model(seed: int = 0) -> torch.nn.Module:
    net = torch.nn.Linear(D_IN, D_OUT)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return net


def step_for(rank: int, version: int) -> Dict[str, torch.Tensor]:
    """The update frontend ``rank`` makes from ``version``: seeded, so every run gives the same."""
    generator = torch.Generator().manual_seed(1000 * rank + version)
    return {"weight": torch.randn(D_OUT, D_IN, generator=generator) * 0.05 * rank,
            "bias": torch.randn(D_OUT, generator=generator) * 0.05}


def federate(chain: Callable[[], Optional[list]], n: int = 3, rounds: int = 2, aggregator: type = aggregate.AverageAggregator,
             asynchronous: Optional[ofl.Asynchronous] = None, count: Optional[int] = None,
             frontend_chain: Optional[Callable[[], Optional[list]]] = None, seed: Optional[int] = None,
             steps: Optional[Callable[[ofl.API], None]] = None, hook: Optional[Callable[[int, ofl.API], None]] = None,
             backend_kwargs: Optional[dict] = None, device: str = "cpu") -> dict:
    """A backend and ``n`` frontend threads; each frontend adds ``step_for(rank, version)`` per version
    to its model, which lives on ``device``."""
    name = f"tf-{uuid.uuid4().hex[:8]}"
    backend = fast_api(False, asynchronous=asynchronous, **(backend_kwargs or {}))
    backend.set_aggregate_triggers(ofl.AggregateCount(count=count or n))
    backend.register_step(ofl.StopAtVersion(max_version=rounds))
    if steps is not None:
        steps(backend)
    links = chain()
    if links is not None:
        backend.set_upload_transforms(*links, seed=seed)
    backend.build_connection(address=memory_address(name, 0, world_size=n + 1))
    net = model()
    backend.set_aggregator_and_optimizer(aggregator(net.parameters()))
    backend.set_state_dict(net.state_dict(keep_vars=True))
    errors: List[BaseException] = []
    uploads: Dict[int, int] = {}

    def frontend(rank: int) -> None:
        api = fast_api(True)
        try:
            links = (frontend_chain or chain)()
            if links is not None:
                api.set_upload_transforms(*links, seed=seed)
            api.build_connection(address=memory_address(name, rank, world_size=n + 1))
            local = model().to(device)
            api.set_aggregator_and_optimizer(aggregator(local.parameters()))
            api.set_state_dict(local.state_dict(keep_vars=True))
            if hook is not None:
                hook(rank, api)
            with api:
                while api.download():
                    with torch.no_grad():
                        for key, delta in step_for(rank, api.version).items():
                            getattr(local, key).add_(delta.to(device))
                    if not api.upload(num_samples=10 * rank):
                        break
                    uploads[rank] = uploads.get(rank, 0) + 1
                    api.update_version()
            api.finish()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=frontend, args=(rank,), daemon=True) for rank in range(1, n + 1)]
    with backend:
        backend.start()
        for thread in threads:
            thread.start()
    failure = None
    try:
        backend.finish()
    except BaseException as exc:
        failure = exc
    for thread in threads:
        thread.join(WAIT)
    return {"api": backend, "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "errors": errors, "failure": failure, "uploads": uploads}


def fedavg(n: int, rounds: int, weights: Optional[List[float]] = None) -> Dict[str, torch.Tensor]:
    """What synchronous FedAvg of ``step_for`` gives, in float64."""
    state = {k: v.double() for k, v in model().state_dict().items()}
    weights = weights or [10.0 * r for r in range(1, n + 1)]
    for version in range(rounds):
        total = sum(weights)
        for key in state:
            state[key] = state[key] + sum(w * step_for(r, version)[key].double() for r, w in zip(range(1, n + 1), weights)) / total
    return state


@pytest.fixture
def log_lines() -> Any:
    """The INFO and WARNING lines logged while a test runs."""
    from loguru import logger

    lines: List[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


# ---------------------------------------------------------------------------------------------- the chain's rules
@pytest.mark.parametrize("links,match", [
    ([T.GaussianNoise(1.0), T.Clip(1.0)], r"Clip must come before GaussianNoise in the upload chain: clip before noise"),
    ([T.SecAgg(clip_range=1.0), T.Cast()], r"Cast must come before SecAgg in the upload chain: compress before mask"),
    ([T.TopK(0.1), T.Clip(1.0)], r"Clip must come before TopK .*clip before compress"),
    ([T.Clip(1.0), T.AdaptiveClip()], r"at most one clipping transform"),
    ([T.QSGD(), T.Cast()], r"at most one compressor"),
    ([T.GaussianNoise(1.0)], r"needs a Clip or AdaptiveClip before it: the noise is scaled to the clip bound"),
    ([T.Clip(1.0), T.QSGD(), T.GaussianNoise(1.0)], r"QSGD cannot be combined with GaussianNoise"),
    ([T.Clip(1.0), T.TopK(0.1), T.GaussianNoise(1.0)], r"TopK\(error_feedback=True\) cannot be combined with GaussianNoise"),
    ([T.TopK(0.1), T.SecAgg(clip_range=1.0)], r"TopK cannot be combined with SecAgg: top-k keeps different coordinates"),
    ([T.QSGD(), T.SecAgg(clip_range=1.0)], r"QSGD cannot be combined with SecAgg"),
    ([T.AdaptiveClip(), T.SecAgg(clip_range=1.0)], r"AdaptiveClip cannot be combined with SecAgg"),
    ([T.SecAgg()], r"SecAgg needs clip_range=\.\.\. .* or a Clip before it"),
    (["clip"], r"upload transforms must be openfl_api.transforms objects"),
    ([], r"needs at least one transform"),
])
def test_a_chain_that_breaks_a_rule_is_refused_with_the_reason(links: list, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        T.Chain(links)


def test_allowed_chains_are_accepted() -> None:
    T.Chain([T.Clip(1.0), T.TopK(0.05, error_feedback=False), T.GaussianNoise(1.0)])
    T.Chain([T.Clip(1.0), T.Cast(torch.float16), T.GaussianNoise(0.5)])
    T.Chain([T.Clip(1.0), T.SecAgg(), T.GaussianNoise(1.0)])
    T.Chain([T.AdaptiveClip(), T.GaussianNoise(0.0)])
    T.Chain([T.TopK(0.05), T.GaussianNoise(0.0)])


@pytest.mark.parametrize("build,match", [
    (lambda: T.Clip(0), r"Clip\(max_norm=...\) must be a finite number in \(0.0, inf\)"),
    (lambda: T.TopK(1.5), r"TopK\(fraction=...\) must be a finite number in \(0.0, 1.0\]"),
    (lambda: T.QSGD(bits=3), r"QSGD\(bits=...\) must be 2, 4 or 8"),
    (lambda: T.Cast(torch.int8), r"Cast\(dtype=...\) must be torch.float16 or torch.bfloat16"),
    (lambda: T.GaussianNoise(-1), r"GaussianNoise\(noise_multiplier=...\) must be a finite number in \[0.0"),
    (lambda: T.GaussianNoise(1.0, accountant="gdp"), r"GaussianNoise\(accountant=...\) must be one of"),
    (lambda: T.AdaptiveClip(target_quantile=2), r"AdaptiveClip\(target_quantile=...\)"),
    (lambda: T.StopAtEpsilon(0), r"StopAtEpsilon\(epsilon=...\) must be a finite number in \(0.0"),
])
def test_transform_arguments_are_validated(build: Callable[[], Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        build()


def test_set_upload_transforms_twice_is_refused() -> None:
    api = fast_api(False)
    api.set_upload_transforms(T.Clip(1.0))
    with pytest.raises(ofl.RoleError, match="called already"):
        api.set_upload_transforms(T.Clip(1.0))


# ---------------------------------------------------------------------------------------------- the join check
def join(backend_links: Optional[list], frontend_links: Optional[list]) -> str:
    """What a frontend with ``frontend_links`` is told when it joins a backend with ``backend_links``."""
    name = f"j-{uuid.uuid4().hex[:8]}"
    backend = fast_api(False)
    if backend_links is not None:
        backend.set_upload_transforms(*backend_links)
    backend.build_connection(address=memory_address(name, 0, world_size=2))
    net = model()
    backend.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
    backend.set_state_dict(net.state_dict(keep_vars=True))
    backend.start()
    frontend = fast_api(True)
    try:
        if frontend_links is not None:
            frontend.set_upload_transforms(*frontend_links)
        frontend.build_connection(address=memory_address(name, 1, world_size=2))
        local = model()
        frontend.set_aggregator_and_optimizer(aggregate.AverageAggregator(local.parameters()))
        frontend.set_state_dict(local.state_dict(keep_vars=True))
        with pytest.raises(ConfigurationError) as refused:
            frontend.download()
        return str(refused.value)
    finally:
        frontend.finish()
        backend.stop("test over")
        backend.finish()


def test_a_frontend_with_another_chain_is_refused_with_the_difference_named() -> None:
    told = join([T.Clip(1.0)], [T.Clip(2.0)])
    assert "Clip(max_norm=...) is 1.0 in the backend's chain and 2.0 in the frontend's" in told


def test_a_frontend_without_the_backends_chain_is_refused() -> None:
    assert "upload chain is [Cast] and the frontend's declares none" in join([T.Cast()], None)


def test_a_frontend_with_a_chain_the_backend_lacks_is_refused() -> None:
    assert "declares upload transforms and the backend none" in join(None, [T.Cast()])


def test_an_upload_whose_header_names_another_chain_is_refused(log_lines: List[str]) -> None:
    answered = threading.Event()  # the others join once rank 1's upload was answered: it counts before version 1

    def hook(rank: int, api: ofl.API) -> None:
        if rank != 1:
            assert answered.wait(WAIT), "rank 1's upload was not answered"
            return
        api._frontend_transforms(api._client)
        side = api._client.transforms
        original_outgoing, original_answered = side.outgoing, side.answered

        def outgoing(*args: Any, **kwargs: Any):
            tensors, wire, meta = original_outgoing(*args, **kwargs)
            return tensors, wire, {**meta, "transforms": "0" * 16}

        def on_answer(accepted: bool) -> None:
            original_answered(accepted)
            answered.set()

        side.outgoing, side.answered = outgoing, on_answer

    result = federate(lambda: [T.Cast(torch.float16)], n=3, rounds=1, count=2, hook=hook)
    assert result["errors"] == [] and result["failure"] is None
    digest = T.Chain([T.Cast(torch.float16)]).digest
    refused = [line for line in log_lines if "rejected the upload" in line]
    assert refused and all(f"its header names upload chain '{'0' * 16}', the backend's is '{digest}'" in line
                           for line in refused), refused


# ---------------------------------------------------------------------------------------------- DP
def test_noise_zero_without_clipping_is_fedavg_bit_for_bit() -> None:
    plain = federate(lambda: None, rounds=3)
    noised = federate(lambda: [T.GaussianNoise(0.0)], rounds=3)
    assert plain["errors"] == noised["errors"] == []
    for key in plain["state"]:
        assert torch.equal(plain["state"][key], noised["state"][key]), key
    expected = fedavg(3, 3)
    assert all(torch.allclose(plain["state"][k].double(), expected[k], atol=1e-6) for k in expected)


def test_a_clip_that_does_not_bind_changes_nothing_and_one_that_binds_bounds_the_update() -> None:
    plain = federate(lambda: None, n=2, rounds=1)
    loose = federate(lambda: [T.Clip(100.0)], n=2, rounds=1)
    assert all(torch.equal(plain["state"][k], loose["state"][k]) for k in plain["state"])
    tight = federate(lambda: [T.Clip(0.01)], n=2, rounds=1, aggregator=aggregate.NaiveAggregator)
    start = model().state_dict()
    moved = torch.cat([(tight["state"][k] - start[k]).reshape(-1) for k in start])
    assert float(moved.norm()) <= 0.01 + 1e-6


def test_the_epsilon_reported_is_the_accountants_own_answer() -> None:
    from opacus.accountants import RDPAccountant

    def links():
        return [T.Clip(0.5), T.GaussianNoise(1.1, delta=1e-5, sample_rate=0.3, seed=0)]

    result = federate(links, n=3, rounds=3, aggregator=aggregate.NaiveAggregator)
    assert result["errors"] == []
    noise = result["api"].upload_transforms.noise
    report = result["api"]._server.exchange.transforms.report
    reference = RDPAccountant()
    for version in (1, 2, 3):  # each version's epsilon, as logged after it
        reference.step(noise_multiplier=1.1, sample_rate=0.3)
        assert report[version]["epsilon"] == reference.get_epsilon(delta=1e-5), version
    assert noise.steps == 3
    assert noise.epsilon() == reference.get_epsilon(delta=1e-5)


def test_the_accountant_matches_the_reference_values() -> None:
    noise = T.GaussianNoise(1.0, delta=1e-5, sample_rate=0.01)
    for _ in range(1000):
        noise.account()
    assert noise.epsilon() == pytest.approx(2.1014, abs=1e-4)  # privacy-compression.md, table 1.2, row 1
    assert T.GaussianNoise(0.0).epsilon() == math.inf


def backend_with(links: list, aggregator: type = aggregate.AverageAggregator) -> ofl.API:
    api = fast_api(False)
    api.set_upload_transforms(*links)
    api.build_connection(address=memory_address(f"b-{uuid.uuid4().hex[:8]}", 0, world_size=2))
    net = model()
    api.set_aggregator_and_optimizer(aggregator(net.parameters()))
    api.set_state_dict(net.state_dict(keep_vars=True))
    return api


def test_noise_above_zero_needs_the_uniform_mean() -> None:
    api = backend_with([T.Clip(1.0), T.GaussianNoise(1.0)])
    with pytest.raises(ConfigurationError, match="GaussianNoise needs aggregate.NaiveAggregator, got AverageAggregator"):
        api.start()
    api.finish()


def test_the_noise_has_the_std_the_clip_bound_and_clients_give() -> None:
    clip, z = 0.01, 2.0
    noisy = federate(lambda: [T.Clip(clip), T.GaussianNoise(z, expected_clients=2, seed=1)], n=2, rounds=1,
                     aggregator=aggregate.NaiveAggregator)
    quiet = federate(lambda: [T.Clip(clip)], n=2, rounds=1, aggregator=aggregate.NaiveAggregator)
    difference = torch.cat([(noisy["state"][k] - quiet["state"][k]).reshape(-1) for k in quiet["state"]])
    # 21 coordinates of N(0, (z C / m)^2): the sample std lies within a factor 2 of z C / m = 0.01.
    assert 0.005 < float(difference.std()) < 0.02


def test_stop_at_epsilon_stops_before_the_budget_is_exceeded() -> None:
    def steps(api: ofl.API) -> None:
        api.register_step(T.StopAtEpsilon(epsilon=12.0))

    links = lambda: [T.Clip(1.0), T.GaussianNoise(1.0, sample_rate=1.0, seed=0)]  # noqa: E731
    result = federate(links, n=2, rounds=50, aggregator=aggregate.NaiveAggregator, steps=steps)
    api = result["api"]
    noise = api.upload_transforms.noise
    assert "privacy budget" in api.stop_reason
    assert noise.epsilon() <= 12.0 < noise.epsilon(extra_steps=1)
    assert api.version == noise.steps < 50


def test_adaptive_clipping_moves_the_bound_towards_the_quantile() -> None:
    clip = T.AdaptiveClip(initial=1.0, target_quantile=0.5, learning_rate=0.2)
    generator = torch.Generator().manual_seed(0)
    up, _ = clip.next_bound(1.0, within=0, clients=10, noise_std=0.0, generator=generator)
    down, _ = clip.next_bound(1.0, within=10, clients=10, noise_std=0.0, generator=generator)
    assert up == pytest.approx(math.exp(0.1)) and down == pytest.approx(math.exp(-0.1))
    result = federate(lambda: [T.AdaptiveClip(initial=1e-4)], n=2, rounds=3)
    assert result["errors"] == []
    assert result["api"]._server.exchange.transforms.bound > 1e-4  # every update was above: the bound grew


# ---------------------------------------------------------------------------------------------- compression
def mlp_schema() -> Schema:
    net = torch.nn.Sequential(torch.nn.Linear(784, 200), torch.nn.Linear(200, 200), torch.nn.Linear(200, 10))
    return Schema.from_tensors(net.state_dict())


@pytest.mark.parametrize("links,low,high", [
    ([T.QSGD(bits=8)], 3.5, 4.0), ([T.QSGD(bits=4)], 7.0, 8.0), ([T.TopK(0.05)], 9.9, 10.0),
    ([T.Cast(torch.float16)], 1.99, 2.0), ([T.Cast(torch.bfloat16)], 1.99, 2.0),
])
def test_compressors_send_fewer_bytes_for_real(links: list, low: float, high: float) -> None:
    schema = mlp_schema()
    wire = T.Chain(links).wire_schema(schema)
    assert low <= schema.nbytes / wire.nbytes <= high


def test_each_version_logs_the_bytes_its_uploads_put_on_the_wire(log_lines: List[str]) -> None:
    result = federate(lambda: [T.Cast(torch.float16)], n=3, rounds=2)
    assert result["errors"] == []
    side = result["api"]._server.exchange.transforms
    each = side.wire_schema.nbytes
    assert each < side.plain_bytes
    assert [side.report[version]["upload_bytes"] for version in (1, 2)] == [each, each]
    for version in (1, 2):
        assert any(line.startswith(f"version {version}: 3 uploads of {each:,} payload bytes each") for line in log_lines)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips(bits: int) -> None:
    codes = torch.randint(0, 2 ** bits - 1, (1001,), dtype=torch.uint8)
    assert torch.equal(_unpack(_pack(codes, bits), bits, 1001), codes)


def test_qsgd_is_unbiased_and_within_its_bucket_scale() -> None:
    quantizer = T.QSGD(bits=4, bucket=64)
    vector = torch.randn(640, generator=torch.Generator().manual_seed(0))
    draws = torch.stack([quantizer.encode(vector, torch.Generator().manual_seed(s))[1] for s in range(400)])
    assert float((draws.mean(0) - vector).abs().max()) < 0.1
    pieces, decoded = quantizer.encode(vector, torch.Generator().manual_seed(0))
    assert torch.equal(quantizer.decode(pieces, 640), decoded)


def test_top_k_with_error_feedback_sends_every_coordinate_eventually() -> None:
    topk = T.TopK(0.1)
    vector = torch.arange(1.0, 101.0)
    pieces, decoded = topk.encode(vector, torch.Generator())
    assert sorted(pieces["wire/indices"].tolist()) == list(range(90, 100))
    assert torch.equal(topk.decode(pieces, 100), decoded)


@pytest.mark.parametrize("pieces,match", [
    ({"wire/indices": torch.tensor([5, 3], dtype=torch.int32), "wire/values": torch.ones(2)}, "strictly increasing"),
    ({"wire/indices": torch.tensor([3, 100], dtype=torch.int32), "wire/values": torch.ones(2)}, r"in \[0, 100\)"),
])
def test_top_k_refuses_indices_no_encoder_produces(pieces: dict, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        T.TopK(0.02).decode(pieces, 100)


def test_qsgd_refuses_levels_past_the_last() -> None:
    with pytest.raises(PayloadError, match=r"codes in \[0, 254\]"):
        T.QSGD(bits=8, bucket=4).decode({"wire/scales": torch.ones(1), "wire/levels": torch.full((4,), 255, dtype=torch.uint8)}, 4)


@pytest.mark.parametrize("links,tolerance", [
    ([T.Cast(torch.float16)], 1e-4), ([T.Cast(torch.bfloat16)], 2e-3), ([T.QSGD(bits=8, bucket=16)], 5e-3),
    ([T.TopK(1.0)], 1e-6),
])
def test_compressed_federations_land_near_fedavg(links: list, tolerance: float) -> None:
    result = federate(lambda: links, rounds=2, seed=0)
    assert result["errors"] == []
    expected = fedavg(3, 2)
    for key, value in expected.items():
        assert float((result["state"][key].double() - value).abs().max()) < tolerance, key


def test_layout_flattens_floating_entries_only() -> None:
    schema = Schema.from_tensors({"w": torch.zeros(2, 3), "steps": torch.zeros((), dtype=torch.int64),
                                  "b": torch.zeros(4, dtype=torch.float64)})
    layout = Layout(schema)
    assert layout.size == 10 and [s.name for s in layout.others] == ["steps"]
    parts = layout.unflatten(torch.arange(10.0))
    assert parts["b"].dtype == torch.float64 and parts["b"].tolist() == [6.0, 7.0, 8.0, 9.0]


# ---------------------------------------------------------------------------------------------- secure aggregation
def secagg(**kwargs: Any) -> Callable[[], list]:
    options = dict(clip_range=0.5, deadline=timedelta(seconds=1))
    options.update(kwargs)
    return lambda: [T.SecAgg(**options)]


def test_secure_aggregation_gives_fedavg_within_the_quantization_step() -> None:
    result = federate(secagg(deadline=timedelta(seconds=10)), n=3, rounds=2)
    assert result["errors"] == [] and result["failure"] is None
    expected = fedavg(3, 2)
    step = T.SecAgg(clip_range=0.5).step(0.5)
    for key, value in expected.items():
        assert float((result["state"][key].double() - value).abs().max()) < 2 * step + 1e-6, key


def test_secure_aggregation_recovers_two_of_six_frontends_dropping_after_masking() -> None:
    def hook(rank: int, api: ofl.API) -> None:
        if rank in (2, 5):
            api._frontend_transforms(api._client)
            side = api._client.transforms
            original = side._masked

            def masked(*args: Any, **kwargs: Any):
                original(*args, **kwargs)
                raise RuntimeError("dropped after masking")

            side._masked = masked

    result = federate(secagg(clip_range=2.0, deadline=timedelta(seconds=15)), n=6, rounds=1, hook=hook)
    assert sorted(str(e) for e in result["errors"]) == ["dropped after masking"] * 2
    survivors = [1, 3, 4, 6]
    state = {k: v.double() for k, v in model().state_dict().items()}
    total = sum(10.0 * r for r in survivors)
    step = T.SecAgg(clip_range=2.0).step(2.0)
    for key in state:
        expected = state[key] + sum(10.0 * r * step_for(r, 0)[key].double() for r in survivors) / total
        assert float((result["state"][key].double() - expected).abs().max()) < step, key


def test_secure_aggregation_with_fedbuff_buffers_in_asynchronous_mode() -> None:
    asynchronous = ofl.Asynchronous(alpha=1.0, max_staleness=None, min_frontends=4)
    result = federate(secagg(cohort=2, deadline=timedelta(seconds=10)), n=4, rounds=4, count=2, asynchronous=asynchronous)
    assert result["errors"] == [] and result["failure"] is None
    assert result["api"].version == 4
    assert sum(result["uploads"].values()) >= 8


def tamper_once(monkeypatch: pytest.MonkeyPatch, client: Optional[str] = None) -> List[str]:
    """``client`` (None: the first member to get there) flips a byte of each self-mask seed share it
    sends back, in its first round; returns [the round] once it did."""
    original, done = SecAggClient.unmask, []
    lock = threading.Lock()

    def unmask(self: SecAggClient, context: Dict[str, Any]) -> None:
        with lock:
            tamper = (client is None or context["client"] == client) and not done
            if tamper:
                done.append(context["round"])
        if tamper:
            context["held"] = {d: (s, bytes([b[0] ^ 1]) + b[1:]) for d, (s, b) in context["held"].items()}
        original(self, context)

    monkeypatch.setattr(SecAggClient, "unmask", unmask)
    return done


def test_a_round_failed_by_a_tampered_share_is_discarded_and_its_next_round_gives_the_clean_runs_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    chain = secagg(threshold=0.7, deadline=timedelta(seconds=10))  # every share is needed: 3 of 3
    clean = federate(chain, n=3, rounds=2, seed=0)
    tamper_once(monkeypatch, "test/rank2")
    tampered = federate(chain, n=3, rounds=2, seed=0)
    assert tampered["errors"] == [] and tampered["failure"] is None and tampered["api"].version == 2
    # The failed round's uploads were not counted: the members trained version 0 again, as in the clean run.
    assert all(torch.equal(clean["state"][k], tampered["state"][k]) for k in clean["state"])


def test_asynchronous_rounds_go_on_after_a_round_failed_by_a_tampered_share(monkeypatch: pytest.MonkeyPatch) -> None:
    tampered = tamper_once(monkeypatch)
    asynchronous = ofl.Asynchronous(alpha=1.0, max_staleness=None, min_frontends=4)
    result = federate(secagg(cohort=2, deadline=timedelta(seconds=10)), n=4, rounds=4, count=2, asynchronous=asynchronous)
    assert tampered == ["b1"]  # the first buffer failed (threshold 2 of 2)
    assert result["errors"] == [] and result["failure"] is None and result["api"].version == 4
    assert all(bool(torch.isfinite(v).all()) for v in result["state"].values())


def test_a_failed_round_names_its_culprit_and_the_fix_and_counts_its_discarded_uploads(
        monkeypatch: pytest.MonkeyPatch, log_lines: List[str]) -> None:
    original, done = Board.append, []

    def append(self: Board, stage: str, value: Any, store: Any = None) -> None:
        if stage.endswith("/shares") and value["client"] == "test/rank1" and not done:
            done.append(stage)
            value = dict(value, commit="0" * 64)  # commits to a seed other than the one it shared
        original(self, stage, value, store)

    monkeypatch.setattr(Board, "append", append)
    result = federate(secagg(deadline=timedelta(seconds=10)), n=3, rounds=1)
    assert result["errors"] == [] and result["failure"] is None and result["api"].version == 1
    failed = [line for line in log_lines if "secure aggregation round 0 failed" in line]
    assert len(failed) == 1, failed
    assert "test/rank1's self-mask seed rebuild a seed that does not match its commitment" in failed[0]
    assert "Culprits: ['test/rank1']" in failed[0] and "Fix: the member named dealt shares" in failed[0]
    assert "3 masked uploads" in failed[0] and "goes on with round 0.1" in failed[0]
    assert result["api"]._server.ledger.discard_reasons["secure aggregation round failed"] == 3


def test_secure_aggregation_needs_a_mean_aggregator_and_one_client_per_frontend() -> None:
    api = backend_with([T.SecAgg(clip_range=1.0)], aggregate.ElasticAggregator)
    with pytest.raises(ConfigurationError, match="SecAgg needs AverageAggregator or NaiveAggregator"):
        api.start()
    api.finish()
    api = fast_api(True, clients=["a", "b"])
    api.set_upload_transforms(T.SecAgg(clip_range=1.0))
    net = model()
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
    api.set_state_dict(net.state_dict(keep_vars=True))
    with pytest.raises(ConfigurationError, match="several virtual clients"):
        from openfl_api.frontend import Client

        api._frontend_transforms(Client(lambda *a: None, api.timeouts, api.log, clients=["a", "b"]))


# ---------------------------------------------------------------------------------------------- CUDA
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_cuda_entries_reach_the_host_through_page_locked_buffers() -> None:
    tensors = {"w": torch.randn(2, 3, device="cuda"), "steps": torch.ones((), dtype=torch.int64, device="cuda")}
    schema = Schema.from_tensors(tensors)
    flat = Layout(schema).flatten(tensors)
    assert flat.is_pinned() and torch.equal(flat, tensors["w"].cpu().reshape(-1))
    header, buffer = encode(tensors, schema, kind="update", version=0, sender="f")
    assert buffer.is_pinned()
    decoded = decode(header, buffer, schema, kind="update").tensors
    assert all(torch.equal(decoded[k], v.cpu()) for k, v in tensors.items())


@CUDA
@pytest.mark.parametrize("links", [
    lambda: None, lambda: [T.GaussianNoise(0.0)], lambda: [T.Clip(0.05)], lambda: [T.Cast(torch.float16)],
    lambda: [T.QSGD(bits=8, bucket=16)], lambda: [T.TopK(0.5)],
    lambda: [T.SecAgg(clip_range=0.5, deadline=timedelta(seconds=10))],
], ids=["plain", "noise 0", "clip", "fp16", "qsgd", "top-k", "secagg"])
def test_frontend_models_on_cuda_give_the_federation_of_models_on_the_cpu_bit_for_bit(links: Callable[[], Any],
                                                                                     device: str = "cuda") -> None:
    on_cpu = federate(links, rounds=2, seed=0)
    on_device = federate(links, rounds=2, seed=0, device=device)
    assert on_device["errors"] == [] and on_device["failure"] is None
    assert all(torch.equal(on_cpu["state"][k], on_device["state"][k]) for k in on_cpu["state"])
