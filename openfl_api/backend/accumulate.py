"""Accumulation of accepted uploads into the aggregator, off the serve loop's critical path.

After the backend has answered an accepted upload, adding it to the aggregator runs on one
accumulation thread while the loop may serve downloads; every other event, and anything that reads
the aggregator (aggregation, checkpoints, the end), settles it first. The aggregator's sums do not
depend on the order of the adds (:class:`~openfl_api.aggregate.exact.ExactSum`), so uploads are
added as they come.
"""

from __future__ import annotations

import inspect
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import torch

from openfl_api.errors import ConfigurationError

__all__ = ["Accumulation", "OVERLAP_BYTES"]

#: Uploads of at least this many bytes are accumulated on the accumulation thread while the loop
#: (and, in one process, the frontend's next client) goes on; smaller ones are added on the loop,
#: where the hand-off (a thread switch, and in one process an interpreter lock that the training
#: frontend holds most of the time) costs more than the exact sum's passes over the upload, about
#: 0.2 ms per MB.
OVERLAP_BYTES = 4 * 1024 * 1024


def _takes_peak(aggregator: Any) -> bool:
    """Whether ``aggregator.add`` takes the upload's ``peak`` (an aggregator of one's own with an
    ``add(tensors, num_samples, weight)`` of its own does not)."""
    known = _PEAK.get(type(aggregator))
    if known is None:
        known = _PEAK[type(aggregator)] = "peak" in inspect.signature(aggregator.add).parameters
    return known


_PEAK: Dict[type, bool] = {}


def _takes_context(aggregator: Any) -> bool:
    """Whether ``aggregator.add`` takes the upload's ``context`` (client, versions)."""
    known = _CONTEXT.get(type(aggregator))
    if known is None:
        known = _CONTEXT[type(aggregator)] = "context" in inspect.signature(aggregator.add).parameters
    return known


_CONTEXT: Dict[type, bool] = {}


class Accumulation:
    """Adds accepted uploads to the aggregator; remembers the clients a version expects.

    Args:
        log: a bound logger.
    """

    def __init__(self, log: Any) -> None:
        self.aggregator: Any = None  # set when the backend is prepared
        self.log = log
        self._expected: Optional[Tuple[int, List[str]]] = None  # (version, clients)
        self._executor: Optional[ThreadPoolExecutor] = None  # started at the first large upload
        self._pending: Optional[Future] = None

    def expected(self, version: int) -> Optional[List[str]]:
        """The clients whose uploads ``version`` expects (a sampling step declares them), or None."""
        if self._expected is None or self._expected[0] != version:
            return None
        return list(self._expected[1])

    def expect(self, clients: List[str], version: int) -> None:
        """Declare the clients taking part in ``version``."""
        order = [str(c) for c in clients]
        if len(set(order)) != len(order):
            raise ConfigurationError(f"expect(...) needs distinct client ids, got {order[:10]}")
        self._expected = (version, order)

    def add(self, worker: Any, tensors: Dict[str, torch.Tensor], num_samples: int, weight: float,
            nbytes: int, peak: Optional[float] = None, context: Optional[Dict[str, Any]] = None) -> None:
        """Add an accepted upload; large ones on the accumulation thread.

        ``context`` (the client, the version it was trained from, its staleness) is passed on to an
        aggregator whose ``add`` takes it.

        The upload was answered already (its ACK goes out within the turn, before this), so the
        frontend goes on meanwhile. ``tensors`` view the worker's receive buffer: ``worker.free`` is
        set once they are no longer read.
        """
        self.settle()

        def run() -> None:
            try:
                extra: Dict[str, Any] = {}
                if peak is not None and _takes_peak(self.aggregator):
                    extra["peak"] = peak
                if context is not None and _takes_context(self.aggregator):
                    extra["context"] = context
                self.aggregator.add(tensors, num_samples, weight, **extra)
            finally:
                worker.free.set()

        if nbytes < OVERLAP_BYTES:
            run()  # a hand-off to another thread costs more than adding a small upload
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openfl-accumulate")
        self._pending = self._executor.submit(run)

    def settle(self, reraise: bool = True) -> None:
        """Wait for the accumulation in progress; re-raise what it raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as exc:
            if reraise:
                raise
            self.log.error(f"an accumulation failed while the loop was ending: {exc!r}")

    def state_dict(self, version: int) -> Dict[str, Any]:
        """The aggregator's sums and the clients the version expects, for a checkpoint."""
        self.settle()
        return {"aggregator": self.aggregator.state_dict(), "expected": self.expected(version)}

    def load_state_dict(self, state: Dict[str, Any], version: int) -> None:
        self.settle()
        self.aggregator.load_state_dict(state["aggregator"])
        expected = state["expected"]
        self._expected = None if expected is None else (version, list(expected))

    def shutdown(self) -> None:
        """Settle what runs (logging a failure) and stop the accumulation thread."""
        self.settle(reraise=False)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
