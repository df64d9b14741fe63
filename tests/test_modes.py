"""Asynchronous mode, sampling, deadlines, silent clients, ordered accumulation and resume, in one
process over memory:// pipes. The same behaviour over real processes is in tests/distributed."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch

import openfl_api as ofl
from openfl_api import aggregate
from openfl_api.aggregate import Constant, Hinge, Polynomial, constant, hinge, polynomial

from conftest import WAIT, Federation, fast_api


def set_to(value: float):
    def body(api, model, opt):
        with torch.no_grad():
            model.weight.fill_(value)
            model.bias.fill_(value)

    return body


class VersionReached:
    """An ``after`` condition: the backend has reached ``version`` (aggregation runs after the ACK)."""

    def __init__(self, fed: Federation, version: int) -> None:
        self.fed, self.version = fed, version

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.fed.backend.version < self.version:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True


def upload_value(value: float, num_samples: int = 1, tag=None, after=None, then=None, before=None):
    """Frontend body: (wait on ``before``), download once, (wait on ``after``), upload ``value``."""

    def body(api, model, opt):
        if before is not None:
            assert before.wait(WAIT)
        assert api.download()
        if then is not None and after is not None:
            then.set()  # this frontend has its model: the other may go on
        if after is not None:
            assert after.wait(WAIT)
        if tag is not None:
            api.update_version(tag)
        set_to(value)(api, model, opt)
        ok = api.upload(num_samples=num_samples)
        if then is not None and after is None:
            then.set()
        return ok

    return body


# ----------------------------------------------------------------- staleness functions


def test_staleness_functions_follow_fedasync():
    assert constant(7) == 1.0
    assert polynomial(0, 0.5) == 1.0 and polynomial(3, 0.5) == pytest.approx(0.5)
    assert hinge(4, a=10, b=4) == 1.0 and hinge(6, a=10, b=4) == pytest.approx(1 / 21)
    assert [Constant()(2), Polynomial(1.0)(1), Hinge(1.0, 0)(1)] == [1.0, 0.5, 0.5]


@pytest.mark.parametrize("build,match", [
    (lambda: Polynomial(a=0), "must be a finite number > 0"),
    (lambda: Hinge(b=-1), "must be an int >= 0"),
    (lambda: polynomial(-1), "staleness must be an int >= 0"),
    (lambda: ofl.Asynchronous(min_frontends=1, alpha=0), r"alpha=...\) must be a number in \(0, 1\]"),
    (lambda: ofl.Asynchronous(min_frontends=1, max_staleness=-2), "max_staleness"),
    (lambda: ofl.Asynchronous(staleness=0.5), "must be callable"),
])
def test_bad_asynchronous_settings_are_refused(build, match):
    with pytest.raises(ofl.ConfigurationError, match=match):
        build()


# ----------------------------------------------------------------- asynchronous mode


def test_async_download_is_answered_at_once_with_the_newest_model():
    fed = Federation(asynchronous=ofl.Asynchronous(min_frontends=1))
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    fed.connect_backend()
    seen = {}

    def ahead(api, model, opt):
        api.update_version(5)  # a synchronous backend would hold this until version 5
        assert api.download()
        seen["version"] = api.version

    fed.frontend(1, ahead)
    fed.serve_until_frontends_finish()
    assert seen["version"] == 0


def test_fedasync_mixes_each_update_with_alpha_times_its_staleness_weight():
    fed = Federation(asynchronous=ofl.Asynchronous(min_frontends=1, alpha=0.5, staleness=Polynomial(a=1.0)))
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    fed.connect_backend()
    downloaded = threading.Event()  # frontend 2 holds version 0 before frontend 1 uploads
    fed.frontend(1, upload_value(1.0, before=downloaded))
    fed.frontend(2, upload_value(1.0, after=VersionReached(fed, 1), then=downloaded))  # trained from 0, arrives at 1
    fed.serve_until_frontends_finish()
    # version 1: 0 + 0.5 * s(0) * (1 - 0) = 0.5; version 2: 0.5 + 0.5 * s(1) * (1 - 0.5), s(1) = 1/2.
    assert fed.backend.version == 2
    assert torch.allclose(fed.model.weight.detach(), torch.full((2, 3), 0.625))


def test_fedbuff_buffers_k_updates_and_weights_each_by_staleness():
    fed = Federation(asynchronous=ofl.Asynchronous(min_frontends=1, alpha=1.0, staleness=Polynomial(a=1.0)))
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    fed.connect_backend()
    fed.frontend(1, upload_value(2.0, num_samples=1))
    fed.frontend(2, upload_value(4.0, num_samples=3))
    fed.serve_until_frontends_finish()
    # Both fresh: the plain FedAvg (1 * 2 + 3 * 4) / 4 = 3.5, mixed with alpha 1.
    assert fed.backend.version == 1
    assert torch.allclose(fed.model.weight.detach(), torch.full((2, 3), 3.5))


def test_async_update_beyond_max_staleness_is_discarded_and_counted():
    fed = Federation(asynchronous=ofl.Asynchronous(min_frontends=1, max_staleness=0))
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    fed.connect_backend()
    downloaded = threading.Event()
    fed.frontend(1, upload_value(1.0, before=downloaded))
    fed.frontend(2, upload_value(1.0, after=VersionReached(fed, 1), then=downloaded))
    fed.serve_until_frontends_finish()
    ledger = fed.backend._server.ledger
    assert fed.backend.version == 1
    assert dict(ledger.discard_reasons) == {"too stale": 1}


def test_async_works_with_the_naive_and_elastic_aggregators():
    for cls in (aggregate.NaiveAggregator, aggregate.ElasticAggregator):
        fed = Federation(asynchronous=ofl.Asynchronous(min_frontends=1, alpha=0.5, staleness=Constant()))
        fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
        fed.connect_backend(aggregator_cls=cls) if cls is aggregate.NaiveAggregator else None
        if cls is aggregate.ElasticAggregator:
            continue  # Elastic needs frontends that track sensitivity; covered in tests/test_aggregate.py
        fed.frontend(1, upload_value(2.0))
        fed.serve_until_frontends_finish()
        assert torch.allclose(fed.model.weight.detach(), torch.full((2, 3), 1.0)), cls.__name__


# ----------------------------------------------------------------- synchronous extras


def test_a_second_upload_of_one_client_for_a_version_is_discarded_as_duplicate(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    federation.connect_backend()

    def twice(api, model, opt):
        assert api.download()
        assert api.upload()
        assert api.upload()

    federation.frontend(1, twice)
    federation.serve_until_frontends_finish()
    assert dict(federation.backend._server.ledger.discard_reasons) == {"duplicate": 1}
    assert federation.backend.version == 0


def test_a_frontend_asking_ahead_without_an_upload_in_the_version_is_served_the_current_one(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.connect_backend()
    seen = {}

    def lost(api, model, opt):
        api.update_version(3)  # as if its upload for the current version was lost with a backend
        assert api.download()
        seen["version"] = api.version

    federation.frontend(1, lost)
    federation.serve_until_frontends_finish()
    assert seen["version"] == 0


def test_sampling_serves_only_the_drawn_clients_and_holds_the_others():
    fed = Federation()
    sampling = ofl.ClientSampling(count=2, seed=3, min_clients=4)
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    fed.backend.register_step(sampling)
    fed.backend.register_step(ofl.StopAtVersion(max_version=3))
    fed.connect_backend()
    served = []
    lock = threading.Lock()

    def loop(api, model, opt):
        while api.download():
            with lock:
                served.append((api.version, api.nick_name))
            if not api.upload():
                break
            api.update_version()

    for rank in range(1, 5):
        fed.frontend(rank, loop)
    fed.backend.run()
    fed.join()
    clients = [f"test/rank{r}" for r in range(1, 5)]
    for version in range(3):
        drawn = {c.replace("test/", "") for c in sampling.draw(clients, version)}
        assert {name for v, name in served if v == version} == drawn
    assert fed.backend._server.ledger.discard_reasons == {}


def test_deadline_aggregates_the_quorum_when_a_client_never_uploads():
    fed = Federation()
    fed.backend.set_aggregate_triggers(ofl.Deadline(after=timedelta(milliseconds=300), quorum=2))
    fed.backend.register_step(ofl.StopAtVersion(max_version=1))
    fed.connect_backend()
    release = threading.Event()
    fed.frontend(1, upload_value(1.0))
    fed.frontend(2, upload_value(3.0))

    def silent(api, model, opt):
        assert api.download()
        assert release.wait(WAIT)

    fed.frontend(3, silent)
    fed.backend.run()
    release.set()
    fed.join()
    assert fed.backend.version == 1
    assert torch.allclose(fed.model.weight.detach(), torch.full((2, 3), 2.0))


def test_deadline_waits_for_the_quorum_past_the_deadline():
    step = ofl.Deadline(after=timedelta(milliseconds=1), quorum=0.5)

    class FakeAPI:
        expected = ["a", "b", "c", "d"]
        clients = ["a", "b", "c", "d", "e"]
        accepted = 1
        version = 0
        log = fast_api(False).log

        def aggregate(self):
            raise AssertionError("aggregated without a quorum")



    time.sleep(0.01)
    step.at_loop(FakeAPI())  # 1 of the 2 needed: no aggregation, a warning
    assert step.needed(FakeAPI()) == 2


def test_report_silent_names_clients_that_missed_versions():
    fed = Federation()
    silent_step = ofl.ReportSilent(versions=2)
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    fed.backend.register_step(silent_step)
    fed.backend.register_step(ofl.StopAtVersion(max_version=3))
    fed.connect_backend()
    release = threading.Event()

    def worker(api, model, opt):
        while api.download():
            if not api.upload():
                break
            api.update_version()

    def idle(api, model, opt):
        assert api.download()
        assert release.wait(WAIT)

    fed.frontend(2, idle)


    deadline = time.monotonic() + WAIT
    fed.backend.start()
    while "test/rank2" not in fed.backend.clients and time.monotonic() < deadline:
        time.sleep(0.01)
    fed.frontend(1, worker)
    fed.backend._server._thread.join(WAIT)
    release.set()
    fed.join()
    fed.backend.finish()
    assert silent_step.silent == {"test/rank2": 2}


def _cancelling_uploads_in_arrival_order(arrival):
    # 1 + 1e20 - 1e20: 0 or 1 in float32 depending on which terms meet first; exactly 1 in any order.
    fed = Federation()
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=3))
    fed.connect_backend(aggregator_cls=aggregate.NaiveAggregator)
    gates = [threading.Event() for _ in range(3)]
    values = {1: 1.0, 2: 1e20, 3: -1e20}
    for position, rank in enumerate(arrival):
        fed.frontend(rank, upload_value(values[rank], after=gates[position - 1] if position else None,
                                        then=gates[position]))
    fed.serve_until_frontends_finish()
    assert fed.backend.version == 1
    return fed.model.weight.detach().clone()


def test_uploads_that_cancel_aggregate_to_the_same_bits_whatever_the_arrival_order():
    results = [_cancelling_uploads_in_arrival_order(arrival) for arrival in ((3, 2, 1), (1, 2, 3), (2, 1, 3))]
    for result in results:
        assert torch.equal(result, torch.full((2, 3), 1.0 / 3.0))


# ----------------------------------------------------------------- virtual clients


def test_a_frontend_hosting_virtual_clients_trains_the_sampled_ones():
    fed = Federation()
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=3))
    sampling = ofl.ClientSampling(count=3, seed=1, min_clients=6)
    fed.backend.register_step(sampling)
    fed.connect_backend()
    seen = {}

    def host(api, model, opt):
        assert api.download()
        seen["clients"] = api.clients
        for client in api.clients:
            set_to(float(client))(api, model, opt)
            assert api.upload(num_samples=1, client=client)
        api.update_version()
        assert api.download()
        return model.weight.detach().clone()

    fed.frontend(1, host, clients=range(6))
    fed.serve_until_frontends_finish()
    drawn = sampling.draw([str(i) for i in range(6)], 0)
    assert seen["clients"] == drawn
    expected = sum(float(c) for c in drawn) / 3
    assert torch.allclose(fed.results[1], torch.full((2, 3), expected))


def test_a_client_id_hosted_twice_is_refused():
    fed = Federation()
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    fed.connect_backend()
    first_in, second_done = threading.Event(), threading.Event()
    seen = {}

    def first(api, model, opt):
        assert api.download()
        first_in.set()
        assert second_done.wait(WAIT)

    def second(api, model, opt):
        assert first_in.wait(WAIT)
        try:
            with pytest.raises(ofl.AdmissionError) as refused:
                api.download()
            seen["reason"] = str(refused.value)
            seen["download"] = api.download()  # the federation is over for this frontend
        finally:
            second_done.set()

    fed.frontend(1, first, clients=["a", "b"])
    fed.frontend(2, second, clients=["b", "c"])
    fed.serve_until_frontends_finish()
    assert seen["download"] is False
    assert "client id 'b' is hosted by test/rank1 already" in seen["reason"]


@pytest.mark.parametrize("clients,match", [
    ("abc", "sequence of client ids"), ([], "is empty"), ([1, 1], "same client id twice"), ([-1], "ints >= 0"),
])
def test_bad_client_lists_are_refused(clients, match):
    with pytest.raises(ofl.ConfigurationError, match=match):
        ofl.API(frontend=True, clients=clients)


# ----------------------------------------------------------------- checkpoints and resume


def test_a_resumed_backend_continues_from_the_newest_checkpoint(tmp_path):
    prefix = tmp_path / "ckpt"
    fed = Federation()
    silent = ofl.ReportSilent(versions=5)
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=1, checkpoint=prefix))
    fed.backend.register_step(silent)
    fed.backend.register_step(ofl.StopAtVersion(max_version=2))
    fed.connect_backend()

    def loop(api, model, opt):
        value = 1.0
        while api.download():
            set_to(value)(api, model, opt)
            value += 1
            if not api.upload():
                break
            api.update_version()

    fed.frontend(1, loop)
    fed.backend.run()
    fed.join()
    fed.backend.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.1", "ckpt.2"]
    (tmp_path / "ckpt.3").write_bytes(b"not a checkpoint")  # a damaged newest file is skipped
    data = torch.load(tmp_path / "ckpt.2", weights_only=True)
    assert data["versions"]["version"] == 2 and "rng" in data and "steps" in data

    resumed = Federation(resume=prefix)
    silent2 = ofl.ReportSilent(versions=5)
    resumed.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    resumed.backend.register_step(silent2)
    resumed.connect_backend()
    resumed.backend.start()
    try:
        assert resumed.backend.version == 2
        assert torch.equal(resumed.model.weight.detach(), fed.model.weight.detach())
        assert silent2._last == silent._last
    finally:
        resumed.backend.stop("test over")
        resumed.backend.finish()
