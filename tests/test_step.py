"""Steps that cannot be misused (openfl_api.step): the closed set of events, misspelled methods,
and api.aggregate()/api.stop() honoured once every step has seen the event at hand."""

from __future__ import annotations

import pytest

import openfl_api as ofl
from openfl_api.step import Event, Step

from conftest import fast_api


class _Calls(ofl.Step):
    def __init__(self, calls):
        self.calls = calls


def test_the_base_class_defines_every_event_as_a_method_that_does_nothing() -> None:
    step = Step()
    for event in Event:
        assert callable(getattr(step, event.value))
    assert step.handlers() == {}


@pytest.mark.parametrize("name,closest", [
    ("after_uplaod", "after_upload"), ("before_donwload", "before_download"), ("on_joined", "on_join"),
    ("after_aggregation", "after_aggregate"), ("at_loops", "at_loop"),
])
def test_a_misspelled_event_is_refused_at_attach_with_the_closest_event(name, closest) -> None:
    misspelled = type("Misspelled", (ofl.Step,), {name: lambda self, api, transfer=None: None})
    with pytest.raises(ofl.ConfigurationError, match=rf"step Misspelled has a method {name}\(\) that is no event, so it "
                                                     rf"would never fire\. Did you mean {closest}\?"):
        fast_api(False).register_step(misspelled())


def test_a_method_named_like_an_event_but_far_from_any_is_refused_and_a_private_helper_is_not() -> None:
    odd = type("Odd", (ofl.Step,), {"after_training": lambda self: None})
    with pytest.raises(ofl.ConfigurationError, match=r"after_training\(\) that is no event.*start a helper's name "
                                                     r"with '_'"):
        fast_api(False).register_step(odd())
    fine = type("Fine", (ofl.Step,), {"_after_training": lambda self: None, "accuracy": lambda self: 1.0})
    fast_api(False).register_step(fine())


def test_aggregate_asked_twice_in_one_event_aggregates_once_after_every_step(federation) -> None:
    calls = []

    class AskToo(_Calls):
        def after_upload(self, api, transfer):
            self.calls.append(("ask", api.version, api.aggregate()))

        def after_aggregate(self, api):
            self.calls.append(("aggregated", api.version))

    with ofl.StepAt(federation.backend):
        ofl.AggregateCount(count=1)
        AskToo(calls)
    federation.connect_backend()

    def once(api, model, opt):
        assert api.download()
        assert api.upload()

    federation.frontend(1, once)
    federation.serve_until_frontends_finish()
    assert calls == [("ask", 0, True), ("aggregated", 1)]
    assert federation.backend.version == 1


def test_stop_in_a_step_lets_the_other_steps_of_the_event_fire_then_no_further_event(federation) -> None:
    calls = []

    class Stopper(_Calls):
        def after_upload(self, api, transfer):
            api.stop("enough")
            self.calls.append("stopper")

    class Later(_Calls):
        def after_upload(self, api, transfer):
            self.calls.append("later")

        def at_loop(self, api):
            if api.stop_reason is not None:
                self.calls.append("at_loop after stop")

    with ofl.StepAt(federation.backend):
        Stopper(calls)
        Later(calls)
    federation.connect_backend()

    def once(api, model, opt):
        assert api.download()
        api.upload()

    federation.frontend(1, once)
    federation.backend.run()
    federation.join()
    assert calls == ["stopper", "later"]
    assert federation.backend.stop_reason == "enough"


def test_an_event_handler_with_the_wrong_arguments_is_refused_at_attach() -> None:
    wrong = type("Wrong", (ofl.Step,), {"after_upload": lambda self, api: None})
    with pytest.raises(ofl.ConfigurationError, match=r"step Wrong.after_upload must accept \(self, api, transfer_or_peer\)"):
        fast_api(False).register_step(wrong())
