"""Tests of openfl_api.state: copying a download into the model."""

from __future__ import annotations

import threading

import pytest
import torch

from openfl_api import state


@pytest.mark.parametrize("sizes", [[3], [1, 2], [2, 1, 1], [1] * 7], ids=["one", "two", "three", "seven"])
def test_copy_all_fills_every_target_whether_it_splits_or_not(monkeypatch, sizes) -> None:
    monkeypatch.setattr(state, "SPLIT_COPY_BYTES", 16)  # every set here is over it
    targets = [torch.nn.Parameter(torch.zeros(4 * n)) for n in sizes]  # requires_grad: autograd must be off
    sources = [torch.full((4 * n,), float(i + 1)) for i, n in enumerate(sizes)]
    state.copy_all_(targets, sources)
    assert all(torch.equal(t.detach(), s) for t, s in zip(targets, sources))


def test_copy_all_uses_a_helper_thread_only_for_large_sets(monkeypatch) -> None:
    seen = []
    copy = state._copy_no_grad
    monkeypatch.setattr(state, "_copy_no_grad", lambda t, s: (seen.append(threading.current_thread().name), copy(t, s)))
    small = [torch.zeros(4), torch.zeros(4)]
    state.copy_all_(small, [torch.ones(4), torch.ones(4)])
    assert seen == [threading.current_thread().name]
    monkeypatch.setattr(state, "SPLIT_COPY_BYTES", 16)
    seen.clear()
    state.copy_all_(small, [torch.ones(4), torch.ones(4)])
    assert sorted(name.startswith("openfl-copy") for name in seen) == [False, True]
