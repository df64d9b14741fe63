"""The backend's hooks for code that drives a serve loop (an edge of a hierarchical federation):
``run(before_serving=...)``, ``Server.adopt``, ``GlobalModel.replace`` and aggregators that
aggregate on the loop's own thread; in one process over memory:// pipes."""

from __future__ import annotations

import threading

import pytest
import torch

import openfl_api as ofl
from openfl_api import aggregate
from openfl_api.errors import ConfigurationError


class Seen(ofl.Step):
    """Records the backend's events in order, with the version and the thread of each."""

    def __init__(self) -> None:
        self.events = []

    def on_join(self, api, peer) -> None:
        self.events.append(("on_join", api.version, threading.current_thread().name))

    def after_aggregate(self, api) -> None:
        self.events.append(("after_aggregate", api.version, threading.current_thread().name))


def download_once(api, model, opt):
    assert api.download()
    return api.version, model.weight.detach().clone()


def test_before_serving_runs_once_before_any_turn_and_its_model_is_the_first_download(federation):
    seen = Seen()
    federation.backend.register_step(seen)
    federation.connect_backend()
    federation.frontend(1, download_once)  # joins before the loop runs
    calls = []

    def before_serving(server):
        calls.append((list(seen.events), server.version))
        server.model.replace({name: torch.full_like(t, 5.0) for name, t in federation.model.state_dict().items()})

    federation.backend.start(before_serving=before_serving)
    federation.join()
    assert calls == [([], 0)]
    version, weight = federation.results[1]
    assert version == 0 and torch.equal(weight, torch.full((2, 3), 5.0))


def test_adopt_starts_the_next_version_with_the_given_model_and_steps_see_after_aggregate(federation, tmp_path):
    seen = Seen()
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=2, checkpoint=str(tmp_path / "ckpt")))
    federation.backend.register_step(seen)
    federation.connect_backend()
    federation.frontend(1, download_once)
    values = {name: torch.full_like(t, 7.0) for name, t in federation.model.state_dict().items()}
    federation.backend.start(before_serving=lambda server: server.adopt(values, "a test's model"))
    federation.join()
    version, weight = federation.results[1]
    assert version == 1 and torch.equal(weight, torch.full((2, 3), 7.0))
    assert seen.events[0][:2] == ("after_aggregate", 1)
    saved = torch.load(tmp_path / "ckpt.1", weights_only=True)
    assert saved["versions"]["version"] == 1


def test_replace_names_the_entries_it_misses(federation):
    federation.connect_backend()
    with pytest.raises(ConfigurationError, match=r"a tensor for every entry of its state_dict; \['bias', 'steps'\] are missing"):
        federation.backend.start(before_serving=lambda server: server.model.replace({"weight": torch.zeros(2, 3)}))
        federation.backend.finish()


class Recording(aggregate.AverageAggregator):
    """Records the name of each thread it aggregates on."""

    threads: list = []

    def aggregate(self, current):
        self.threads.append(threading.current_thread().name)
        return super().aggregate(current)


class OnLoopThread(Recording):
    on_loop_thread = True


@pytest.mark.parametrize("aggregator_cls, thread", [(OnLoopThread, "openfl-serve-loop"), (Recording, "frontend-1")])
def test_an_on_loop_thread_aggregator_aggregates_on_the_loops_thread_not_the_uploads(federation, aggregator_cls,
                                                                                        thread):
    federation.backend.set_aggregate_triggers(ofl.AggregateCount(count=1))
    federation.backend.register_step(ofl.StopAtVersion(max_version=1))
    federation.connect_backend(aggregator_cls=aggregator_cls)
    Recording.threads = []

    def upload_once(api, model, opt):
        return api.download() and api.upload(num_samples=1)

    federation.frontend(1, upload_once)
    federation.backend.start()
    federation.join()
    federation.backend.finish()  # the loop ends at version 1
    assert federation.results[1] and federation.backend.version == 1
    assert Recording.threads == [thread]  # the upload that asked for it came on the frontend's thread
