"""Accumulation of accepted uploads into the aggregator, off the serve loop's critical path.

After the backend has answered an accepted upload, adding it to the aggregator runs on one
accumulation thread while the loop may serve downloads; every other event, and anything that reads
the aggregator (aggregation, ``expect``, checkpoints, the end), settles it first. Uploads of the
clients a version expects (``expect``) are added in the expected order, whatever order they arrive
in; one that arrives before its predecessors is kept aside until they are in.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple

import torch

from openfl_api.errors import ConfigurationError

__all__ = ["Accumulation", "OVERLAP_BYTES"]

#: Uploads of at least this many bytes are accumulated on the accumulation thread while the loop
#: goes on; smaller ones are added on the loop, where the hand-off would cost more than the addition.
OVERLAP_BYTES = 4 * 1024 * 1024

_Kept = Tuple[Dict[str, torch.Tensor], int, float]


class Accumulation:
    """Adds accepted uploads to the aggregator, in the expected order when there is one.

    Args:
        transfer: how long an accumulation waits for the worker to send its answer.
        log: a bound logger.
    """

    def __init__(self, transfer: timedelta, log: Any) -> None:
        self.aggregator: Any = None  # set when the backend is prepared
        self._transfer = transfer.total_seconds()
        self.log = log
        self._expected: Optional[Tuple[int, List[str]]] = None  # (version, accumulation order)
        self._next = 0  # index into the expected order of the next upload to add
        self._early: Dict[str, _Kept] = {}
        self._executor: Optional[ThreadPoolExecutor] = None  # started at the first large upload
        self._pending: Optional[Future] = None

    def expected(self, version: int) -> Optional[List[str]]:
        """The clients whose uploads ``version`` expects, in accumulation order, or None."""
        if self._expected is None or self._expected[0] != version:
            return None
        return list(self._expected[1])

    def expect(self, clients: List[str], version: int, accepted: int) -> None:
        """Declare the clients of ``version``; must come before its first accepted upload."""
        self.settle()
        order = [str(c) for c in clients]
        if len(set(order)) != len(order):
            raise ConfigurationError(f"expect(...) needs distinct client ids, got {order[:10]}")
        if accepted:
            raise ConfigurationError(
                f"expect(...) must come before the version's first accepted upload; {accepted} are in already"
            )
        self._expected = (version, order)
        self._next = 0
        self._early.clear()

    def add(self, worker: Any, client: str, tensors: Dict[str, torch.Tensor], num_samples: int, weight: float,
            version: int, nbytes: int) -> None:
        """Add an accepted upload of ``client``; large ones on the accumulation thread.

        ``tensors`` view the worker's receive buffer: ``worker.free`` is set once they are no longer
        read, and the thread starts adding once ``worker.replied`` is set (a thread holding the
        interpreter lock held up the worker's answer by up to 3 ms on 2 CPUs).
        """
        self.settle()

        def run(after_reply: bool) -> None:
            try:
                if after_reply:
                    worker.replied.wait(self._transfer)
                self._accept(client, tensors, num_samples, weight, version)
            finally:
                worker.free.set()

        if nbytes < OVERLAP_BYTES:
            run(False)  # a hand-off to another thread costs more than adding a small upload
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openfl-accumulate")
        self._pending = self._executor.submit(run, True)

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

    def finish_version(self, version: int) -> None:
        """Before aggregating ``version``: add the uploads kept aside, skipping clients that never came."""
        self.settle()
        self._flush(version, final=True)
        self._expected, self._next = None, 0

    def _accept(self, client: str, tensors: Dict[str, torch.Tensor], num_samples: int, weight: float,
                version: int) -> None:
        order = self.expected(version)
        in_turn = order is None or client not in order or (self._next < len(order) and order[self._next] == client)
        if in_turn:
            self.aggregator.add(tensors, num_samples, weight)
            if order is not None and client in order:
                self._next += 1
                self._flush(version, final=False)
            return
        # The upload views the pipe's receive buffer, reused for the next message: keep a copy.
        self._early[client] = ({n: t.clone() for n, t in tensors.items()}, num_samples, weight)
        self._flush(version, final=False)

    def _flush(self, version: int, final: bool) -> None:
        order = self.expected(version)
        if order is None:
            return
        while self._next < len(order) and (order[self._next] in self._early or final):
            kept = self._early.pop(order[self._next], None)
            if kept is not None:
                self.aggregator.add(*kept)
            self._next += 1

    def state_dict(self, version: int) -> Dict[str, Any]:
        """The aggregator's sums and the uploads kept aside, for a checkpoint."""
        self.settle()
        order = self.expected(version)
        return {
            "aggregator": self.aggregator.state_dict(),
            "expected": None if order is None else {"order": order, "next": self._next},
            "early": {c: {"tensors": t, "num_samples": n, "weight": w} for c, (t, n, w) in self._early.items()},
        }

    def load_state_dict(self, state: Dict[str, Any], version: int) -> None:
        self.settle()
        self.aggregator.load_state_dict(state["aggregator"])
        expected = state["expected"]
        self._expected = None if expected is None else (version, list(expected["order"]))
        self._next = 0 if expected is None else int(expected["next"])
        self._early = {c: (e["tensors"], int(e["num_samples"]), float(e["weight"])) for c, e in state["early"].items()}

    def shutdown(self) -> None:
        """Settle what runs (logging a failure) and stop the accumulation thread."""
        self.settle(reraise=False)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
