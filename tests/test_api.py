"""The API in one process over memory:// pipes: versions, discards, payload checks, aggregation."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import torch

import openfl_api as ofl
from openfl_api import aggregate
from openfl_api.backend import accumulate
from openfl_api.payload import MAX_HEADER_BYTES, encode, parse_header
from openfl_api.state import SharedState
from openfl_api.transport.base import Kind, Limits, Message

from conftest import WAIT, Federation, Model, fast_api, memory_address, train_loop


def upload_constant(value: float, num_samples: int):
    """A frontend body that downloads once, sets every parameter to ``value`` and uploads it."""

    def body(api, model, opt):
        assert api.download()
        with torch.no_grad():
            model.weight.fill_(value)
            model.bias.fill_(value)
        assert api.upload(num_samples=num_samples)
        api.update_version()
        assert api.download()
        return model.weight.detach().clone()

    return body


def test_sync_rounds_reach_max_version_and_end_the_loop(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    federation.backend.register_step(ofl.StopAtVersion(max_version=3))
    federation.connect_backend()
    seen = {1: [], 2: []}
    federation.frontend(1, train_loop(seen[1]))
    federation.frontend(2, train_loop(seen[2]))
    federation.backend.run()
    federation.join()
    assert federation.backend.version == 3
    assert seen[1] == [0, 1, 2] and seen[2] == [0, 1, 2]
    assert federation.results == {1: 3, 2: 3}


def test_fedavg_of_known_tensors_equals_the_hand_computed_weighted_average(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    federation.connect_backend()
    federation.frontend(1, upload_constant(1.0, num_samples=1))
    federation.frontend(2, upload_constant(3.0, num_samples=3))
    federation.serve_until_frontends_finish()
    # (1 * 1.0 + 3 * 3.0) / (1 + 3) = 2.5, by hand.
    assert torch.equal(federation.model.weight.detach(), torch.full((2, 3), 2.5))
    assert torch.equal(federation.results[1], torch.full((2, 3), 2.5))


def test_a_stale_upload_is_discarded_and_counted(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.connect_backend()
    federation.backend.start()
    downloaded = threading.Event()
    aggregated = threading.Event()
    replies = {}

    def stale(api, model, opt):
        assert api.download()  # version 0
        downloaded.set()
        assert aggregated.wait(WAIT)
        assert api.upload()  # still tagged 0, but the global version is 1 now
        replies["stale"] = api._client.ledger.totals()

    def fresh(api, model, opt):
        assert downloaded.wait(WAIT)
        assert api.download()
        assert api.upload()
        api.update_version()
        assert api.download()  # returns once version 1 exists
        aggregated.set()

    federation.frontend(1, stale)
    federation.frontend(2, fresh)
    federation.join()
    federation.backend.stop("test over")
    federation.backend.finish()
    totals = federation.backend._server.ledger.totals()
    assert totals["Discard"] == 1
    assert federation.backend._server.ledger.discard_reasons == {"stale": 1}
    assert replies["stale"]["Discard"] == 1
    assert federation.backend.version == 1


def test_an_upload_from_a_future_version_is_discarded(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.connect_backend()
    federation.backend.start()

    def future(api, model, opt):
        assert api.download()
        api.update_version(5)
        assert api.upload()

    federation.frontend(1, future)
    federation.join()
    federation.backend.stop("test over")
    federation.backend.finish()
    assert federation.backend._server.ledger.discard_reasons == {"future": 1}
    assert federation.backend.version == 0


def _bad_payloads():
    """(name, header bytes, buffer) of uploads that must be rejected; built from a valid one."""
    model = Model(1.0)
    state = SharedState(model.state_dict(keep_vars=True),
                                aggregate.AverageAggregator(model.parameters()), None)
    header, buffer = encode(state.upload_tensors(), state.upload_schema, kind="update", version=0,
                            sender="rogue", meta={"num_samples": 1, "metrics": {}})
    fields = parse_header(header)

    def edited(change):
        copy = json.loads(json.dumps(fields))
        change(copy)
        return json.dumps(copy).encode()

    nan = buffer.clone()
    nan[:4].view(torch.float32)[0] = float("nan")
    return [
        ("wrong shape", edited(lambda h: h["tensors"][0].update(shape=[3, 2])), buffer),
        ("wrong dtype", edited(lambda h: h["tensors"][0].update(dtype="float64")), buffer),
        ("wrong size", header, buffer[:-64]),
        ("nan", header, nan),
        ("garbage header", b"\x00\xffnot json", buffer),
        ("bad num_samples", edited(lambda h: h["meta"].update(num_samples=-3)), buffer),
    ]


@pytest.mark.parametrize("name,header,buffer", _bad_payloads(), ids=[c[0] for c in _bad_payloads()])
def test_a_tampered_payload_is_rejected_and_the_model_is_unchanged(federation, name, header, buffer):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.connect_backend()
    federation.backend.start()
    replies = {}

    def rogue(api, model, opt):
        assert api.download()
        before = model.weight.detach().clone()
        client = api._client
        reply = client._exchange(Message(Kind.UPLOAD, header, buffer),
                                 Limits(frozenset({Kind.ACK, Kind.END}), MAX_HEADER_BYTES, 0))
        replies["ack"] = parse_header(reply.header)
        assert api.download()
        replies["unchanged"] = torch.equal(model.weight.detach(), before)
        assert api.upload()  # the federation goes on: a valid upload is accepted
        replies["after"] = client.ledger.totals()

    federation.frontend(1, rogue)
    federation.join()
    federation.backend.stop("test over")
    federation.backend.finish()
    assert replies["ack"]["accepted"] is False
    assert "invalid payload" in replies["ack"]["reason"]
    assert replies["unchanged"]
    assert federation.backend._server.ledger.discard_reasons == {"invalid payload": 1}
    assert federation.backend.version == 1


def test_optimizer_state_rides_along_when_the_aggregator_asks_for_it(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    federation.connect_backend(state_keys=("momentum_buffer",))

    def momentum(value):
        def body(api, model, opt):
            assert api.download()
            opt.state[model.weight]["momentum_buffer"] = torch.full((2, 3), value)
            opt.state[model.bias]["momentum_buffer"] = torch.full((2,), value)
            assert api.upload(num_samples=1)
            api.update_version()
            assert api.download()
            return opt.state[model.weight]["momentum_buffer"].clone()
        return body

    federation.frontend(1, momentum(2.0), state_keys=("momentum_buffer",))
    federation.frontend(2, momentum(4.0), state_keys=("momentum_buffer",))
    federation.serve_until_frontends_finish()
    assert torch.equal(federation.results[1], torch.full((2, 3), 3.0))


def test_a_server_optimizer_applies_the_aggregate_as_a_gradient(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    server_sgd = torch.optim.SGD(federation.model.parameters(), lr=0.5)
    federation.connect_backend(server_optimizer=server_sgd)
    federation.frontend(1, upload_constant(4.0, num_samples=1))
    federation.serve_until_frontends_finish()
    # global 0 - 0.5 * (0 - 4) = 2
    assert torch.equal(federation.model.weight.detach(), torch.full((2, 3), 2.0))


def test_checkpoints_are_written_per_version_and_load_with_weights_only(federation, tmp_path):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1, checkpoint=tmp_path / "ckpt"))
    federation.connect_backend()
    federation.frontend(1, upload_constant(2.0, num_samples=1))
    federation.serve_until_frontends_finish()
    saved = torch.load(tmp_path / "ckpt.1", weights_only=True)
    assert saved["versions"]["version"] == 1
    assert torch.equal(saved["model"]["state_dict"]["weight"], torch.full((2, 3), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.1"]


def test_aggregate_period_aggregates_what_arrived(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregatePeriod(timedelta(milliseconds=50)))
    federation.connect_backend()
    federation.frontend(1, upload_constant(1.0, num_samples=1))
    federation.serve_until_frontends_finish()
    assert federation.backend.version == 1


def test_stop_at_loop_ends_an_idle_backend(federation):
    federation.backend.register_step(ofl.StopAtLoop(max_loop=5))
    federation.connect_backend()
    federation.backend.run()
    assert federation.backend.loop_count == 5
    assert federation.backend.stop_reason == "loop 5 reached max_loop=5"


def test_a_wrong_token_is_refused(federation):
    federation.connect_backend()
    federation.backend.start()
    rogue = fast_api(True, token="not-the-token")
    with pytest.raises(ofl.AdmissionError, match="wrong token"):
        rogue.build_connection(address=memory_address(federation.name, 1))
    federation.backend.stop("test over")
    federation.backend.finish()
    assert len(federation.backend._server.ledger.refused) == 1


def test_the_backend_returns_false_at_once_and_refuses_frontend_calls(federation):
    federation.connect_backend()
    assert federation.backend.download() is False
    assert federation.backend.upload() is False
    with pytest.raises(ofl.RoleError, match="frontend method"):
        federation.backend.update_version()
    federation.backend.finish()


def test_frontend_calls_before_connecting_explain_what_is_missing():
    api = fast_api(True)
    with pytest.raises(ofl.RoleError, match="build_connection"):
        api.download()
    with pytest.raises(ofl.ConfigurationError, match="num_samples"):
        api.upload(num_samples=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "needs address="),
    (dict(address=ofl.Address(init_method="memory://x", world_size=3, rank=0)), "rank >= 1"),
])
def test_build_connection_validates_the_address_for_the_role(kwargs, match):
    with pytest.raises(ofl.AddressError, match=match):
        fast_api(True).build_connection(**kwargs)


def test_api_arguments_are_validated():
    with pytest.raises(ofl.ConfigurationError, match="positive datetime.timedelta"):
        ofl.API(frontend=True, timeout=5)
    with pytest.raises(ofl.ConfigurationError, match="True, False or None"):
        ofl.API(frontend=1)


def test_run_without_an_aggregator_says_what_to_call(federation):
    federation.backend.build_connection(address=memory_address(federation.name, 0))
    federation.backend.set_state_dict(federation.model.state_dict(keep_vars=True))
    with pytest.raises(ofl.ConfigurationError, match="set_aggregator_and_optimizer"):
        federation.backend.run()
    federation.backend.finish()


def test_an_address_added_to_a_watched_file_is_served_and_a_removed_one_closed(federation, tmp_path):
    path = tmp_path / "federation.json"
    first = ofl.Address(init_method=f"memory://{federation.name}-a", world_size=3, rank=0, group_name="a")
    second = ofl.Address(init_method=f"memory://{federation.name}-b", world_size=3, rank=0, group_name="b")
    ofl.dump_address_file(path, [first])
    federation.backend.build_connection(address_file=path)
    federation.backend.set_aggregator_and_optimizer(aggregate.AverageAggregator(federation.model.parameters()))
    federation.backend.set_state_dict(federation.model.state_dict(keep_vars=True))
    federation.backend.start()
    ofl.dump_address_file(path, [first, second])
    late = fast_api(True)
    late.build_connection(address=second.replace(rank=1))  # admitted only if the backend serves b
    late.set_state_dict(Model().state_dict(keep_vars=True))
    assert late.download()
    ofl.dump_address_file(path, [first])
    deadline = time.monotonic() + WAIT
    while second.key in federation.backend._server.addresses.lobbies and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the backend's own state, not waiting for another rank
    assert late.download() is False  # the backend closed b: the next request gets END
    assert "removed" in late.stop_reason
    late.finish()
    federation.backend.stop("test over")
    federation.backend.finish()


def test_a_changed_entry_of_a_watched_file_is_served_again_and_its_frontend_joins_again(federation, tmp_path):
    path = tmp_path / "federation.json"
    entry = ofl.Address(init_method=f"memory://{federation.name}-c", world_size=2, rank=0, group_name="c")
    ofl.dump_address_file(path, [entry])
    federation.backend.build_connection(address_file=path)
    federation.backend.set_aggregator_and_optimizer(aggregate.AverageAggregator(federation.model.parameters()))
    federation.backend.set_state_dict(federation.model.state_dict(keep_vars=True))
    federation.backend.start()
    frontend = fast_api(True)
    frontend.build_connection(address=entry.replace(world_size=3, rank=1))
    frontend.set_state_dict(Model().state_dict(keep_vars=True))
    assert frontend.download()
    served = federation.backend._server.addresses.lobbies[entry.key]
    ofl.dump_address_file(path, [entry.replace(world_size=3)])
    deadline = time.monotonic() + WAIT
    while federation.backend._server.addresses.lobbies.get(entry.key) in (served, None) and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the backend's own state, not waiting for another rank
    lobby = federation.backend._server.addresses.lobbies[entry.key]
    assert lobby is not served and lobby.address.world_size == 3 and lobby.store is served.store
    # The next request is told to join again, joins the entry's new session and is answered.
    assert frontend.download()
    assert frontend.stop_reason is None
    second = fast_api(True)
    second.build_connection(address=entry.replace(world_size=3, rank=2))  # rank 2 exists only now
    second.finish()
    frontend.finish()
    federation.backend.stop("test over")
    federation.backend.finish()


class Boom(ofl.Step):
    roles = frozenset({"backend"})

    def after_aggregate(self, api):
        raise ValueError("boom")


def test_a_raising_step_stops_the_loop_and_is_named_even_when_fired_by_another_step(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.backend.register_step(Boom())
    federation.connect_backend()
    ended = {}

    def body(api, model, opt):
        assert api.download()
        assert api.upload()
        api.update_version()
        ended["download"] = api.download()

    federation.frontend(1, body)
    with pytest.raises(ofl.StepError, match="step 'Boom' raised at after_aggregate: ValueError: boom") as info:
        federation.backend.run()
    assert isinstance(info.value.__cause__, ValueError)
    federation.join()
    assert ended["download"] is False
    federation.backend.finish()


class Threads(ofl.Step):
    """Records (event, thread name) of the backend's events."""

    roles = frozenset({"backend"})

    def __init__(self):
        self.seen = []

    def on_join(self, api, peer):
        self.seen.append(("on_join", threading.current_thread().name))

    def before_download(self, api, transfer):
        self.seen.append(("before_download", threading.current_thread().name))

    def before_upload(self, api, transfer):
        self.seen.append(("before_upload", threading.current_thread().name))


def test_an_in_process_frontends_requests_are_handled_on_its_own_thread_after_its_join(federation):
    threads = Threads()
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.backend.register_step(threads)
    federation.backend.register_step(ofl.StopAtVersion(max_version=1))
    federation.connect_backend()
    federation.frontend(1, train_loop([]))
    federation.serve_until_frontends_finish()
    assert threads.seen[0][0] == "on_join"
    # A request sent before the pipe's thread handed delivery over comes on that thread; the
    # upload, sent after the first answer, always comes on the frontend's.
    assert {name for event, name in threads.seen if event == "before_download"} <= {"frontend-1", "openfl-pipe-test/rank1"}
    assert [name for event, name in threads.seen if event == "before_upload"] == ["frontend-1"]


def test_an_upload_made_in_inference_mode_leaves_the_backend_able_to_aggregate(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.backend.register_step(ofl.StopAtVersion(max_version=2))
    federation.connect_backend()

    def body(api, model, opt):
        with torch.inference_mode():  # the backend's handling on this thread must not inherit it
            while api.download():
                if not api.upload(num_samples=1):
                    break
                api.update_version()
        return api.version

    federation.frontend(1, body)
    federation.serve_until_frontends_finish()
    assert federation.backend.version == 2
    assert not federation.backend._server.model.aggregator._sum._scratch.is_inference()


def test_an_error_while_handling_an_in_process_request_is_raised_by_run_and_ends_the_frontend(federation, monkeypatch):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.connect_backend()

    def broken(worker, message):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(federation.backend._server.exchange, "upload", broken)
    ended = {}

    def body(api, model, opt):
        assert api.download()
        ended["upload"] = api.upload()

    federation.frontend(1, body)
    with pytest.raises(RuntimeError, match="disk on fire"):
        federation.backend.run()
    federation.join()
    assert ended["upload"] is False
    assert "RuntimeError while handling a request" in federation.backend.stop_reason


def test_an_error_on_the_loops_own_thread_is_raised_by_run_and_named_in_the_stop_reason(federation, monkeypatch):
    federation.connect_backend()

    def broken():
        raise RuntimeError("clock skew")

    monkeypatch.setattr(federation.backend._server.exchange, "release_waiting", broken)
    with pytest.raises(RuntimeError, match="clock skew"):
        federation.backend.run()
    assert federation.backend.stop_reason == "RuntimeError in the serve loop: clock skew"


def test_a_frontend_admitted_before_run_can_upload_first(federation):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.backend.register_step(ofl.StopAtVersion(max_version=1))
    federation.connect_backend()
    joined = threading.Event()

    def upload_first(api, model, opt):
        joined.set()
        return api.upload()

    federation.frontend(1, upload_first)
    assert joined.wait(WAIT)
    federation.backend.run()
    federation.join()
    assert federation.results[1] is True
    assert federation.backend.version == 1


class Recorder(ofl.Step):
    def __init__(self, name, calls):
        self.label, self.calls = name, calls

    def on_join(self, api, peer):
        self.calls.append((self.label, "on_join"))

    def before_download(self, api, transfer):
        self.calls.append((self.label, "before_download"))

    def after_download(self, api, transfer):
        self.calls.append((self.label, "after_download"))

    def before_upload(self, api, transfer):
        self.calls.append((self.label, "before_upload"))

    def after_upload(self, api, transfer):
        self.calls.append((self.label, f"after_upload accepted={transfer.accepted}"))

    def after_aggregate(self, api):
        self.calls.append((self.label, f"after_aggregate v{api.version}"))


def test_custom_steps_fire_in_attach_order_at_each_event(federation):
    calls = []
    with ofl.StepAt(federation.backend):
        Recorder("first", calls)
        ofl.AggregateCount(count=1)
        Recorder("second", calls)
    federation.connect_backend()
    federation.frontend(1, upload_constant(1.0, num_samples=1))
    federation.serve_until_frontends_finish()
    assert calls == [
        ("first", "on_join"), ("second", "on_join"),
        ("first", "before_download"), ("second", "before_download"),
        ("first", "after_download"), ("second", "after_download"),
        ("first", "before_upload"), ("second", "before_upload"),
        # AggregateCount, attached between the recorders, asks for the aggregation in its
        # after_upload; it happens once every step has seen the upload.
        ("first", "after_upload accepted=True"), ("second", "after_upload accepted=True"),
        ("first", "after_aggregate v1"), ("second", "after_aggregate v1"),
        ("first", "before_download"), ("second", "before_download"),
        ("first", "after_download"), ("second", "after_download"),
    ]


def test_a_removed_step_stops_firing_and_a_step_attached_later_fires_after_the_others():
    api = fast_api(False)
    calls = []
    first, second = api.register_step(Recorder("first", calls)), api.register_step(Recorder("second", calls))
    api._fire(ofl.Event.AFTER_AGGREGATE)
    first.remove()
    api._fire(ofl.Event.AFTER_AGGREGATE)
    api.register_step(Recorder("third", calls))
    api._fire(ofl.Event.AFTER_AGGREGATE)
    second.remove()
    api._fire(ofl.Event.AFTER_AGGREGATE)
    assert [label for label, _ in calls] == ["first", "second", "second", "second", "third", "third"]


class GatedAggregator(aggregate.AverageAggregator):
    """FedAvg whose accumulation waits for ``gate``; ``entered`` is set once one has started."""

    gate = threading.Event()
    entered = threading.Event()

    def add(self, tensors, num_samples, weight=1.0):
        GatedAggregator.entered.set()
        assert GatedAggregator.gate.wait(WAIT), "the test never opened the gate"
        super().add(tensors, num_samples, weight)


def test_a_download_is_served_while_an_upload_is_still_accumulated(federation, monkeypatch):
    monkeypatch.setattr(accumulate, "OVERLAP_BYTES", 0)  # this model is tiny; overlap it anyway
    GatedAggregator.gate.clear()
    GatedAggregator.entered.clear()
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    federation.connect_backend(aggregator_cls=GatedAggregator)
    joined, served_meanwhile = threading.Event(), threading.Event()

    def first(api, model, opt):
        assert joined.wait(WAIT)  # a join is an event the loop handles only once accumulations are done
        assert api.download()
        assert api.upload(num_samples=1)  # acknowledged before its accumulation ends
        assert served_meanwhile.wait(WAIT)  # leaving is an event too: stay until the check is done
        return True

    def second(api, model, opt):
        assert api.download()
        joined.set()
        assert GatedAggregator.entered.wait(WAIT)
        assert api.download()
        served_meanwhile.set()  # the first upload's accumulation is still held at the gate
        GatedAggregator.gate.set()
        assert api.upload(num_samples=3)
        api.update_version()
        assert api.download()
        return api.version

    federation.frontend(1, first)
    federation.frontend(2, second)
    federation.serve_until_frontends_finish()
    assert served_meanwhile.is_set() and federation.results == {1: True, 2: 1}
    assert federation.backend.version == 1


@pytest.fixture
def log_lines():
    from loguru import logger

    lines = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def test_a_forgotten_update_version_is_named_on_both_sides(federation, log_lines):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    federation.connect_backend()
    four_done = threading.Event()

    def forgets(api, model, opt):
        for _ in range(4):
            assert api.download()
            assert api.upload()  # and no api.update_version()
        four_done.set()

    def slow(api, model, opt):
        assert api.download()
        assert four_done.wait(WAIT)
        assert api.upload()

    federation.frontend(1, forgets)
    federation.frontend(2, slow)
    federation.serve_until_frontends_finish()
    assert federation.backend._server.ledger.discard_reasons == {"duplicate": 3}
    assert sum("3 uploads in a row were duplicates of version 0; its training loop most likely does not call "
               "api.update_version() after api.upload()" in line for line in log_lines) == 1
    assert sum("downloaded version 0 again, which this frontend has already uploaded an update for: call "
               "api.update_version() after api.upload()" in line for line in log_lines) == 3


def test_a_loop_that_moves_its_version_is_not_warned_when_served_the_same_version_again(log_lines):
    federation = Federation(asynchronous=ofl.Asynchronous(min_frontends=1))
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    federation.connect_backend()
    served = []

    def moves_on(api, model, opt):
        for _ in range(2):
            assert api.download()
            served.append(api.version)
            assert api.upload()
            api.update_version()

    federation.frontend(1, moves_on)
    federation.serve_until_frontends_finish()
    assert served == [0, 0]  # the asynchronous backend serves its newest model: version 0 until 2 uploads came
    assert not any("again, which this frontend has already uploaded" in line for line in log_lines)


def test_an_address_files_rank_decides_the_role(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / "frontend.json"
    ofl.dump_address_file(path, [ofl.Address(init_method="memory://nowhere-rank", world_size=3, rank=2)])
    api = fast_api(None, connect_timeout=timedelta(seconds=1))
    with pytest.raises(ofl.TransportError):
        api.build_connection(address_file=path)  # no backend there: it tried as the frontend it is
    assert (api.role, api.rank) == ("frontend", 2)
