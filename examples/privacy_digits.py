"""Upload transforms on scikit-learn's digits, 10 clients: compression, client-level DP, local DP-SGD.

    python examples/privacy_digits.py compress [--rounds 30]   # Dirichlet(0.5): bytes and accuracy per compressor
    python examples/privacy_digits.py dp [--rounds 10]         # DP-FedAvg at epsilon 1, 3, 8 (and no noise)
    python examples/privacy_digits.py local-dp [--rounds 10]   # Opacus DP-SGD in each client's loop, epsilon 1, 3, 8

One process: the backend and 10 frontends run as threads over a ``memory://`` address, with the
same API, chain and aggregators as a launched federation. Each client trains an MLP 64-32-10 for
one local epoch per version (batch 16, SGD lr 0.1); the test accuracy of the final global model
is printed with the payload bytes of one upload. ``compress`` partitions the training split with
Dirichlet(0.5) over labels; ``dp`` and ``local-dp`` use an IID split. Needs scikit-learn and
Opacus (``pip install 'openfl_api[digits,privacy]'``).
"""

from __future__ import annotations

import argparse
import threading
import uuid
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import torch

import openfl_api as ofl
from openfl_api import aggregate, data
from openfl_api import transforms as T
from openfl_api.virtual_clients import init_linear_

CLIENTS = 10
DELTA = 1e-5


def mlp(seed: int) -> torch.nn.Module:
    return init_linear_(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)), seed)


def federate(chain: Callable[[], Optional[list]], parts: List[List[int]], digits: data.TrainTest, rounds: int,
             seed: int = 0, lr: float = 0.1, naive: bool = False, steps: Optional[list] = None,
             local_epsilon: Optional[float] = None) -> Dict[str, object]:
    """Train ``rounds`` versions; return the accuracy, versions, payload bytes per upload and epsilon."""
    name = f"memory://digits-{uuid.uuid4().hex[:8]}"
    Aggregator = aggregate.NaiveAggregator if naive else aggregate.AverageAggregator
    timeouts = dict(timeout=timedelta(seconds=300), connect_timeout=timedelta(seconds=60),
                    drain=timedelta(seconds=5), tick=timedelta(milliseconds=5), token="digits")
    backend = ofl.API(frontend=False, **timeouts)
    backend.set_aggregate_triggers(ofl.AggregateCount(count=CLIENTS))
    backend.register_step(ofl.StopAtVersion(max_version=rounds))
    for step in steps or []:
        backend.register_step(step)
    links = chain()
    if links is not None:
        backend.set_upload_transforms(*links, seed=seed)
    backend.build_connection(address=ofl.Address(init_method=name, world_size=CLIENTS + 1, rank=0))
    global_net = mlp(seed)
    backend.set_aggregator_and_optimizer(Aggregator(global_net.parameters()))
    backend.set_state_dict(global_net.state_dict(keep_vars=True))
    errors: List[BaseException] = []
    spent: Dict[int, float] = {}

    def client(index: int) -> None:
        api = ofl.API(frontend=True, **timeouts)
        try:
            links = chain()
            if links is not None:
                api.set_upload_transforms(*links, seed=seed)
            api.build_connection(address=ofl.Address(init_method=name, world_size=CLIENTS + 1, rank=index + 1))
            net = mlp(seed)
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            api.set_aggregator_and_optimizer(Aggregator(net.parameters()), opt)
            api.set_state_dict(net.state_dict(keep_vars=True))
            x, y = digits.x_train[parts[index]], digits.y_train[parts[index]]
            generator = torch.Generator().manual_seed(seed * 1000 + index)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                                 shuffle=True, generator=generator)
            model, optimizer = net, opt
            engine = None
            if local_epsilon is not None:
                from opacus import PrivacyEngine

                # One engine per client for the whole run: its accountant counts every round's steps.
                engine = PrivacyEngine(accountant="rdp")
                model, optimizer, loader = engine.make_private_with_epsilon(
                    module=net, optimizer=opt, data_loader=loader, target_epsilon=local_epsilon,
                    target_delta=DELTA, epochs=rounds, max_grad_norm=1.0, noise_generator=generator)
            while api.download():
                for xb, yb in loader:
                    if len(yb) == 0:
                        continue
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(model(xb), yb).backward()
                    optimizer.step()
                if not api.upload(num_samples=len(y)):
                    break
                api.update_version()
            if engine is not None:
                spent[index] = engine.get_epsilon(DELTA)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            api.finish()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    backend.start()
    backend.finish()
    for thread in threads:
        thread.join(300)
    if errors:
        raise errors[0]
    with torch.no_grad():
        accuracy = (global_net(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    side = backend._server.exchange.transforms
    reports = side.report if side is not None else {}
    upload = next((r["upload_bytes"] for r in reports.values() if "upload_bytes" in r),
                  backend._server.model.state.upload_schema.nbytes)
    chain_epsilon = backend.upload_transforms.noise.epsilon() if side is not None and side.chain.noise else None
    return {"accuracy": accuracy, "versions": backend.version, "upload_bytes": upload,
            "epsilon": chain_epsilon, "local_epsilon": max(spent.values()) if spent else None}


COMPRESSORS: Dict[str, Callable[[], Optional[list]]] = {
    "fp32 (plain)": lambda: None,
    "QSGD 8 bits": lambda: [T.QSGD(bits=8, bucket=512)],
    "QSGD 4 bits": lambda: [T.QSGD(bits=4, bucket=512)],
    "top-5% without EF": lambda: [T.TopK(0.05, error_feedback=False)],
    "top-5% with EF": lambda: [T.TopK(0.05, error_feedback=True)],
    "fp16": lambda: [T.Cast(torch.float16)],
    "bf16": lambda: [T.Cast(torch.bfloat16)],
}


def compress(rounds: int, seed: int) -> None:
    digits = data.load_digits(seed=seed)
    parts = data.dirichlet(digits.y_train, num_clients=CLIENTS, alpha=0.5, seed=seed)
    print(f"compression, digits Dirichlet(0.5), {CLIENTS} clients, {rounds} versions")
    for label, chain in COMPRESSORS.items():
        result = federate(chain, parts, digits, rounds, seed)
        print(f"{label:18s} accuracy {100 * result['accuracy']:6.2f} %  upload {result['upload_bytes']:8,.0f} bytes",
              flush=True)


def dp(rounds: int, seed: int, clip: float) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    digits = data.load_digits(seed=seed)
    parts = data.iid(len(digits.y_train), CLIENTS, seed=seed)
    print(f"DP-FedAvg, digits IID, {CLIENTS} clients all taking part (q = 1), {rounds} versions, clip {clip}, "
          f"delta {DELTA}")
    result = federate(lambda: [T.Clip(clip)], parts, digits, rounds, seed, naive=True)
    print(f"no noise        accuracy {100 * result['accuracy']:6.2f} %", flush=True)
    for epsilon in (8.0, 3.0, 1.0):
        z = get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=1.0, steps=rounds,
                                 accountant="rdp")

        def chain(z: float = z) -> list:
            return [T.Clip(clip), T.GaussianNoise(z, delta=DELTA, sample_rate=1.0, expected_clients=CLIENTS, seed=seed)]

        result = federate(chain, parts, digits, rounds, seed, naive=True, steps=[T.StopAtEpsilon(epsilon)])
        print(f"epsilon {epsilon:<6g}  accuracy {100 * result['accuracy']:6.2f} %  noise multiplier {z:.3f}  "
              f"spent {result['epsilon']:.3f}  versions {result['versions']}", flush=True)


def local_dp(rounds: int, seed: int) -> None:
    digits = data.load_digits(seed=seed)
    parts = data.iid(len(digits.y_train), CLIENTS, seed=seed)
    print(f"local DP-SGD (Opacus, per-sample clip 1.0), digits IID, {CLIENTS} clients, {rounds} versions, "
          f"delta {DELTA}")
    result = federate(lambda: None, parts, digits, rounds, seed)
    print(f"no DP           accuracy {100 * result['accuracy']:6.2f} %", flush=True)
    for epsilon in (8.0, 3.0, 1.0):
        result = federate(lambda: None, parts, digits, rounds, seed, local_epsilon=epsilon)
        print(f"epsilon {epsilon:<6g}  accuracy {100 * result['accuracy']:6.2f} %  largest client epsilon "
              f"{result['local_epsilon']:.3f}", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("compress", "dp", "local-dp"))
    parser.add_argument("--rounds", type=int, default=None, help="versions (default 30 for compress, 10 otherwise)")
    parser.add_argument("--clip", type=float, default=1.0, help="dp: the clip bound C")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ofl.logger.log_level("WARNING")
    torch.set_num_threads(1)
    if args.mode == "compress":
        compress(args.rounds or 30, args.seed)
    elif args.mode == "dp":
        dp(args.rounds or 10, args.seed, args.clip)
    else:
        local_dp(args.rounds or 10, args.seed)


if __name__ == "__main__":
    main()
