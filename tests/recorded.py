"""In-process federations (memory:// pipes, one thread per frontend) that evaluate and record, for
the tests of evaluation, records and plots."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import openfl_api as ofl
from conftest import Federation


def loop(evaluate: bool = True, every: Optional[int] = None, calls: Optional[List[int]] = None) -> Callable:
    """A frontend body: the standard loop with ``api.evaluate`` after each download. The test
    metrics depend on the model and the rank, the training loss on the model."""

    def body(api: ofl.API, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Dict[str, Any]:
        ended_by_evaluate = False

        def test():
            if calls is not None:
                calls.append(api.version)
            return 10 * api.rank, {"accuracy": float(model.weight.detach().sum()) + api.rank, "loss": 1.0 / api.rank}

        while api.download():
            if evaluate and not api.evaluate(test, every=every):
                ended_by_evaluate = True
                break
            opt.zero_grad()
            (model.weight.sum() + model.bias.sum()).backward()
            opt.step()
            if not api.upload(num_samples=4 * api.rank, metrics={"loss": float(model.weight.detach().sum())}):
                break
            api.update_version()
        return {"version": api.version, "reason": api.stop_reason, "by_evaluate": ended_by_evaluate}

    return body


def federation(record: Any = None, versions: int = 3, frontends: int = 2, steps: Sequence[ofl.Step] = (),
               body: Optional[Callable] = None, checkpoint: Optional[str] = None, resume: Optional[str] = None,
               **backend: Any) -> Federation:
    """Run a federation to ``versions`` with ``steps`` on the backend; returns it finished."""
    fed = Federation(record=record, resume=resume, **backend)
    fed.backend.set_aggregate_triggers(ofl.AggregateCount(count=frontends, checkpoint=checkpoint))
    with ofl.StepAt(fed.backend):
        ofl.StopAtVersion(max_version=versions)
    for step in steps:
        fed.backend.register_step(step)
    fed.connect_backend()
    for rank in range(1, frontends + 1):
        fed.frontend(rank, body or loop())
    fed.serve_until_frontends_finish()
    return fed
