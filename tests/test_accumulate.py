"""Where an accepted upload is added (openfl_api.backend.accumulate): by the pipe thread that
received it, after its turn, or on the accumulation thread; and that settling never waits for an
add that only the settling thread itself would run."""

import threading
from typing import List

import pytest
import torch

from openfl_api.backend.accumulate import OVERLAP_BYTES, Accumulation


class Summing:
    """An aggregator that records the thread of each add."""

    def __init__(self) -> None:
        self.total = torch.zeros(4)
        self.threads: List[str] = []

    def add(self, tensors, num_samples, weight):
        self.total += tensors["w"] * weight
        self.threads.append(threading.current_thread().name)


class PipeWorker:
    """The part of a backend Worker that the accumulation uses: a gloo pipe whose thread is the one
    that built it, or an in-process pipe (``own=False``), whose requests come on any thread."""

    def __init__(self, own: bool) -> None:
        self.own = own
        self.owner = threading.get_ident()
        self.deferred = None
        self.free = threading.Event()

    def receives_on_own_thread(self) -> bool:
        return self.own and threading.get_ident() == self.owner


def accumulation() -> Accumulation:
    acc = Accumulation(log=None)
    acc.aggregator = Summing()
    return acc


def test_a_large_upload_from_a_pipe_thread_is_added_by_that_thread_after_its_turn():
    acc, worker = accumulation(), PipeWorker(own=True)
    acc.add(worker, {"w": torch.ones(4)}, 1, 2.0, nbytes=OVERLAP_BYTES)
    assert worker.deferred is not None and acc.aggregator.threads == []  # nothing added within the turn
    Accumulation.run_deferred(worker)  # Worker.handle, after the turn
    assert acc.aggregator.threads == [threading.current_thread().name]
    assert worker.free.is_set() and worker.deferred is None
    acc.settle()
    assert torch.equal(acc.aggregator.total, torch.full((4,), 2.0))


def test_settling_within_the_turn_that_deferred_the_add_runs_it_at_once():
    # An aggregation asked for by a step of the same turn settles: waiting for this thread's own
    # add after the turn would wait forever.
    acc, worker = accumulation(), PipeWorker(own=True)
    acc.add(worker, {"w": torch.ones(4)}, 1, 1.0, nbytes=OVERLAP_BYTES)
    done = threading.Event()
    threading.Thread(target=lambda: (acc.settle(), done.set()), daemon=True).start()
    assert not done.wait(0.2)  # another thread waits for the pipe thread's add...
    acc2, worker2 = accumulation(), PipeWorker(own=True)
    acc2.add(worker2, {"w": torch.ones(4)}, 1, 1.0, nbytes=OVERLAP_BYTES)
    acc2.settle()  # ...the pipe thread itself adds it
    assert worker2.deferred is None and torch.equal(acc2.aggregator.total, torch.ones(4))
    Accumulation.run_deferred(worker)
    assert done.wait(5) and torch.equal(acc.aggregator.total, torch.ones(4))


def test_a_large_upload_brought_by_the_frontends_thread_is_added_on_the_accumulation_thread():
    acc, worker = accumulation(), PipeWorker(own=False)
    acc.add(worker, {"w": torch.ones(4)}, 1, 1.0, nbytes=OVERLAP_BYTES)
    assert worker.deferred is None
    acc.settle()
    assert acc.aggregator.threads[0].startswith("openfl-accumulate") and worker.free.is_set()
    acc.shutdown()


def test_a_small_upload_is_added_within_the_turn():
    acc, worker = accumulation(), PipeWorker(own=True)
    acc.add(worker, {"w": torch.ones(4)}, 1, 1.0, nbytes=OVERLAP_BYTES - 1)
    assert worker.deferred is None and acc.aggregator.threads == [threading.current_thread().name]


def test_a_deferred_add_that_raises_is_raised_by_settle():
    acc, worker = accumulation(), PipeWorker(own=True)
    acc.add(worker, {"w": torch.ones(3)}, 1, 1.0, nbytes=OVERLAP_BYTES)  # wrong shape: the add raises
    Accumulation.run_deferred(worker)
    assert worker.free.is_set()
    with pytest.raises(RuntimeError):
        acc.settle()
