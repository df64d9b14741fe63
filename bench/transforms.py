"""What each upload transform costs per upload, as ratios to the plain upload measured in the same run.

    python bench/transforms.py [--repeats 7] [--rounds 6] [--models mlp,resnet18]

For the MLP 784-200-200-10 (0.8 MB) and a ResNet-18-sized state_dict (46.8 MB, bench/transfer.py's),
one process, one torch thread:

- **per upload**: the frontend's work (the chain's ``outgoing`` and the payload encoding) and the
  backend's (payload decoding with its checks, and the chain's ``incoming``: decoding, adding the
  reference), against the same for the plain upload; and the payload bytes. The median of
  ``--repeats``. SecAgg's row is a member of a 10-member round: quantization, its self mask and 9
  pairwise masks on the frontend; on the backend the ring addition, plus a tenth of the round's
  unmasking (one self-mask expansion per member).
- **per round**: a synchronous federation of 10 frontends over in-memory pipes, with and without
  SecAgg (the MLP), the median seconds per version after the first; the difference is SecAgg's
  extra cost per round (its key, share and unmask stages over the store, and the masking).

Compare figures within one run only: a shared machine's speed drifts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import openfl_api as ofl  # noqa: E402
from openfl_api import aggregate  # noqa: E402
from openfl_api import transforms as T  # noqa: E402
from openfl_api.logger import bind  # noqa: E402
from openfl_api.payload import decode, encode  # noqa: E402
from openfl_api.state import SharedState  # noqa: E402
from openfl_api.transforms import crypto  # noqa: E402
from openfl_api.transforms.backend_side import BackendSide  # noqa: E402
from openfl_api.transforms.chain import Chain  # noqa: E402
from openfl_api.transforms.frontend_side import FrontendSide  # noqa: E402
from openfl_api.transforms.secagg import quantize  # noqa: E402

LOG = bind("bench")

CHAINS: Dict[str, Callable[[], List[Any]]] = {
    "Clip (binding)": lambda: [T.Clip(1e-3)],
    "Cast bf16": lambda: [T.Cast(torch.bfloat16)],
    "Cast fp16": lambda: [T.Cast(torch.float16)],
    "QSGD 8 bits": lambda: [T.QSGD(bits=8)],
    "QSGD 4 bits": lambda: [T.QSGD(bits=4)],
    "TopK 5% + EF": lambda: [T.TopK(0.05)],
    "TopK 1% + EF": lambda: [T.TopK(0.01)],
}


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 200), torch.nn.ReLU(),
                               torch.nn.Linear(200, 10))


def resnet() -> torch.nn.Module:
    from transfer import build_model

    return build_model(0)


#: The noise of each timing: half its interquartile range, in % of its median, per label.
NOISE: Dict[str, float] = {}


def spread(values: List[float]) -> float:
    """Half the interquartile range of ``values`` in % of their median (0 for fewer than 2)."""
    if len(values) < 2:
        return 0.0
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return 100 * (high - low) / 2 / statistics.median(values)


def timed(call: Callable[[], Any], repeats: int, label: str = "") -> float:
    """The median milliseconds of ``repeats`` calls; their spread goes to ``NOISE[label]``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    NOISE[label] = spread(times)
    return 1000 * statistics.median(times)


def per_upload(net: torch.nn.Module, repeats: int) -> List[Dict[str, Any]]:
    state = SharedState(net.state_dict(keep_vars=True), aggregate.AverageAggregator(net.parameters()), None)
    reference = {k: v.detach().clone() for k, v in state.model.items()}
    trained = {k: (v + 1e-3 * torch.randn_like(v)) if v.is_floating_point() else v for k, v in reference.items()}
    schema = state.upload_schema
    rows = []

    def plain() -> None:
        header, buffer = encode(trained, schema, kind="update", version=0, sender="f", meta={"num_samples": 1})
        decode(header, buffer, schema, kind="update", reused=False)

    front_plain = timed(lambda: encode(trained, schema, kind="update", version=0, sender="f",
                                       meta={"num_samples": 1}), repeats, "plain fp32/front")
    header, buffer = encode(trained, schema, kind="update", version=0, sender="f", meta={"num_samples": 1})
    back_plain = timed(lambda: decode(header, buffer, schema, kind="update", reused=False), repeats, "plain fp32/back")
    rows.append({"transform": "plain fp32", "front": front_plain, "back": back_plain, "bytes": schema.nbytes})
    server = SimpleNamespace(model=SimpleNamespace(current=lambda: reference, optim_state={}, state=state))
    api = SimpleNamespace(log=LOG, asynchronous=None, version=0)
    timeouts = SimpleNamespace(idle=timedelta(seconds=60), status=timedelta(seconds=10))
    for label, links in CHAINS.items():
        chain = Chain(links(), seed=0)
        backend = BackendSide(chain, api, server, None, lambda: None)
        frontend = FrontendSide(chain, state, LOG, None, timeouts, b"bench")
        frontend.downloaded(reference, backend.fields())

        def front() -> Any:
            tensors, wire, meta = frontend.outgoing(trained, 0, "c", 1, None)
            meta.update(num_samples=1)
            return encode(tensors, wire, kind="update", version=0, sender="f", meta=meta)

        head, wire_buffer = front()
        wire_schema = frontend.wire_schema

        def back() -> None:
            payload = decode(head, wire_buffer, wire_schema, kind="update", reused=False)
            backend.incoming(payload.tensors, payload.meta, "c", 1, (len(head), wire_schema.nbytes))

        rows.append({"transform": label, "front": timed(front, repeats, f"{label}/front"),
                     "back": timed(back, repeats, f"{label}/back"),
                     "bytes": wire_schema.nbytes})
    # SecAgg, one member of a 10-member round.
    size = sum(v.numel() for v in reference.values() if v.is_floating_point())
    vector = torch.randn(size) * 1e-3
    seeds = [bytes([i]) * 32 for i in range(10)]

    def secagg_front() -> None:
        levels, _ = quantize(vector, 0.01, 16, torch.Generator().manual_seed(0))
        words = levels.copy()
        for seed in seeds:
            words += crypto.mask(seed, size)

    total = np.zeros(size, dtype=np.uint32)
    masked = torch.from_numpy(np.random.default_rng(0).integers(0, 2**32, size, dtype=np.uint32).view(np.int32))
    wire = Chain([T.SecAgg(clip_range=0.01)]).wire_schema(schema)
    meta = {"num_samples": 1, "transforms": "x"}
    head, wire_buffer = encode({"wire/masked": masked}, wire, kind="update", version=0, sender="f", meta=meta)

    def secagg_back() -> None:
        payload = decode(head, wire_buffer, wire, kind="update", reused=False)
        np.add(total, payload.tensors["wire/masked"].numpy().view(np.uint32), out=total)
        total.__isub__(crypto.mask(seeds[0], size))  # a tenth of the round's unmasking

    rows.append({"transform": "SecAgg (10 members)", "front": timed(secagg_front, repeats, "SecAgg (10 members)/front"),
                 "back": timed(secagg_back, repeats, "SecAgg (10 members)/back"), "bytes": wire.nbytes})
    for row in rows:
        row["front_ratio"] = row["front"] / front_plain
        row["back_ratio"] = row["back"] / back_plain
        row["bytes_ratio"] = schema.nbytes / row["bytes"]
    return rows


def per_round(secure: bool, rounds: int, clients: int = 10) -> List[float]:
    """Seconds per version of a synchronous federation of ``clients`` frontends (MLP)."""
    name = f"memory://bench-{uuid.uuid4().hex[:8]}"
    options = dict(timeout=timedelta(seconds=120), connect_timeout=timedelta(seconds=60), drain=timedelta(seconds=5),
                   tick=timedelta(milliseconds=5), token="bench")
    links = (lambda: [T.SecAgg(clip_range=0.05, deadline=timedelta(seconds=60))]) if secure else (lambda: None)
    marks: List[float] = []

    class Mark(ofl.Step):
        roles = frozenset({"backend"})

        def after_aggregate(self, api: Any) -> None:
            marks.append(time.perf_counter())

    backend = ofl.API(frontend=False, **options)
    backend.set_aggregate_triggers(ofl.AggregateCount(count=clients))
    backend.register_step(ofl.StopAtVersion(max_version=rounds))
    backend.register_step(Mark())
    if links() is not None:
        backend.set_upload_transforms(*links())
    backend.build_connection(address=ofl.Address(init_method=name, world_size=clients + 1, rank=0))
    net = mlp()
    backend.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
    backend.set_state_dict(net.state_dict(keep_vars=True))

    def frontend(rank: int) -> None:
        api = ofl.API(frontend=True, **options)
        if links() is not None:
            api.set_upload_transforms(*links())
        api.build_connection(address=ofl.Address(init_method=name, world_size=clients + 1, rank=rank))
        local = mlp()
        api.set_aggregator_and_optimizer(aggregate.AverageAggregator(local.parameters()))
        api.set_state_dict(local.state_dict(keep_vars=True))
        with api:
            while api.download():
                with torch.no_grad():
                    for p in local.parameters():
                        p.add_(1e-3)
                if not api.upload():
                    break
                api.update_version()
        api.finish()

    threads = [threading.Thread(target=frontend, args=(r,), daemon=True) for r in range(1, clients + 1)]
    for thread in threads:
        thread.start()
    backend.start()
    backend.finish()
    for thread in threads:
        thread.join(120)
    return [b - a for a, b in zip(marks, marks[1:])]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=6, help="versions of each per-round federation")
    parser.add_argument("--models", default="mlp,resnet18")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ofl.logger.log_level("WARNING")
    for model_name in args.models.split(","):
        net = mlp() if model_name == "mlp" else resnet()
        nbytes = sum(v.numel() * v.element_size() for v in net.state_dict().values())
        print(f"\nper upload, {model_name} ({nbytes / 1e6:.1f} MB), median of {args.repeats} (noise: half the "
              "interquartile range, % of the median); ratios to the plain upload")
        print("| transform | frontend ms | noise | ratio | backend ms | noise | ratio | payload bytes | x fewer |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in per_upload(net, args.repeats):
            label = row["transform"]
            print(f"| {label} | {row['front']:.2f} | {NOISE[label + '/front']:.0f}% | {row['front_ratio']:.1f} | "
                  f"{row['back']:.2f} | {NOISE[label + '/back']:.0f}% | {row['back_ratio']:.1f} | {row['bytes']:,} | "
                  f"{row['bytes_ratio']:.2f} |")
    plain = per_round(False, args.rounds)
    secure = per_round(True, args.rounds)
    a, b = statistics.median(plain), statistics.median(secure)
    print(f"\nper round, 10 frontends, MLP, median of {len(plain)} versions: plain {1000 * a:.0f} ms "
          f"(noise {spread(plain):.0f}%), SecAgg {1000 * b:.0f} ms (noise {spread(secure):.0f}%); extra "
          f"{1000 * (b - a):.0f} ms per round, ratio SecAgg / plain {b / a:.2f}")


if __name__ == "__main__":
    main()
