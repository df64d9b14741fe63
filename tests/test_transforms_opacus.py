"""Local DP-SGD with Opacus's PrivacyEngine inside the user's frontend loop (examples/privacy_digits.py local-dp)."""

from __future__ import annotations

import threading
import uuid

import pytest
import torch

import openfl_api as ofl
from openfl_api import aggregate

from conftest import WAIT, fast_api, memory_address

opacus = pytest.importorskip("opacus")


def test_local_dp_sgd_in_the_frontend_loop_reports_the_accountants_epsilon() -> None:
    from opacus import PrivacyEngine
    from opacus.accountants import RDPAccountant

    name = f"dpsgd-{uuid.uuid4().hex[:8]}"
    backend = fast_api(False)
    backend.set_aggregate_triggers(ofl.AggregateCount(count=2))
    backend.register_step(ofl.StopAtVersion(max_version=2))
    backend.build_connection(address=memory_address(name, 0, world_size=3))
    global_net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    backend.set_aggregator_and_optimizer(aggregate.AverageAggregator(global_net.parameters()))
    backend.set_state_dict(global_net.state_dict(keep_vars=True))
    found: dict = {}
    errors: list = []

    def frontend(rank: int) -> None:
        api = fast_api(True)
        try:
            api.build_connection(address=memory_address(name, rank, world_size=3))
            net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), opt)
            # The user's model keeps its keys: the state_dict is the inner model's, not the wrapper's.
            api.set_state_dict(net.state_dict(keep_vars=True))
            generator = torch.Generator().manual_seed(rank)
            x, y = torch.randn(256, 20, generator=generator), torch.randint(0, 2, (256,), generator=generator)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
            engine = PrivacyEngine(accountant="rdp")
            model, optimizer, loader = engine.make_private(module=net, optimizer=opt, data_loader=loader,
                                                           noise_multiplier=1.0, max_grad_norm=1.0,
                                                           noise_generator=generator)
            with api:
                while api.download():
                    for xb, yb in loader:
                        if len(yb):
                            optimizer.zero_grad()
                            torch.nn.functional.cross_entropy(model(xb), yb).backward()
                            optimizer.step()
                    if not api.upload(num_samples=256):
                        break
                    api.update_version()
            found[rank] = (engine.get_epsilon(1e-5), list(engine.accountant.history))
            api.finish()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=frontend, args=(rank,), daemon=True) for rank in (1, 2)]
    with backend:
        backend.start()
        for thread in threads:
            thread.start()
    backend.finish()
    for thread in threads:
        thread.join(WAIT)
    assert errors == []
    assert backend.version == 2
    for epsilon, history in found.values():
        # 8 batches per epoch, one epoch per version, 2 versions: 16 steps at q = 1/8.
        assert history == [(1.0, 0.125, 16)]
        reference = RDPAccountant()
        reference.history = [(1.0, 0.125, 16)]
        assert epsilon == reference.get_epsilon(1e-5)
