"""Steps: small objects attached to one API that fire at a closed set of events.

A step overrides the methods named after the events it cares about. Steps fire in the order they
were attached, while the model is owned by their event (the backend's serve loop holding its lock,
on its own thread or, for an in-memory frontend's request, on that frontend's thread; or the
frontend's caller), so they never race. They act through the API (``api.aggregate()``, ``api.stop(reason)``,
``api.save_checkpoint(path)``) and through the :class:`Transfer` they are given
(``transfer.discard(reason)``), never through return values.

- ``at_loop(api)``: backend, every serve-loop iteration (each message handled, or every
  ``tick`` when idle). Never on a frontend.
- ``on_join(api, peer)`` / ``on_leave(api, peer)``: backend, a frontend was admitted / its pipe
  closed (goodbye, crash, timeout, address removed).
- ``before_download(api, transfer)``: backend, a download is about to be served; frontend,
  ``api.download()`` is about to ask.
- ``after_download(api, transfer)``: backend, the model was handed to the pipe; frontend, the
  model was loaded into the tensors.
- ``before_upload(api, transfer)``: backend, a valid upload arrived and the version rule has not
  decided yet (``transfer.discard(reason)`` drops it); frontend, ``api.upload()`` is about to send.
- ``after_upload(api, transfer)``: backend, the upload was accepted or discarded
  (``transfer.accepted``, ``transfer.reason``); frontend, the backend acknowledged it.
- ``after_aggregate(api)``: backend, a new global version exists. Never on a frontend.
- ``after_evaluate(api, transfer)``: backend, a frontend reported its evaluation of a global
  model; frontend, ``api.evaluate()`` reported it and the backend answered.

Transfer events are called as ``method(api, transfer)``. After ``api.stop()`` the loop finishes the
event at hand (its remaining steps still fire), then no further event fires. A step that raises
stops the loop; ``run()`` raises :class:`~openfl_api.errors.StepError` naming the step, with the
step's exception chained.

A step fires on the roles in its ``roles`` attribute (built-ins that drive aggregation are
backend-only), so the same script can attach the same steps on every rank.

Writing a step::

    class LogAccuracy(ofl.Step):
        def after_upload(self, api, transfer):
            if transfer.accepted:
                print(api.version, transfer.rank, transfer.metrics.get("accuracy"))
"""

from openfl_api.step.aggregation import AggregateCount, AggregatePeriod, Deadline
from openfl_api.step.base import BACKEND, FRONTEND, Event, Step, StepAt, Transfer, current_scope
from openfl_api.step.clients import ClientSampling, ReportSilent
from openfl_api.step.control import StopAtLoop, StopAtVersion
from openfl_api.step.registry import Steps

__all__ = [
    "Event",
    "Transfer",
    "Step",
    "StepAt",
    "Steps",
    "AggregateCount",
    "AggregatePeriod",
    "StopAtVersion",
    "StopAtLoop",
    "Deadline",
    "ClientSampling",
    "ReportSilent",
    "current_scope",
    "BACKEND",
    "FRONTEND",
]
