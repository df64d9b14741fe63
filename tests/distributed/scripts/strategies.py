"""Every algorithm of examples/strategies_federation.py at once, each in a federation of its own, one
thread per algorithm in every rank (tests/distributed/test_strategies_processes.py).

Each algorithm gets its own address, derived from the rank's (``file://P`` -> ``file://P.<algorithm>``,
``memory://N`` -> ``memory://N.<algorithm>``, ``tcp://H:P`` -> port ``P + 1 + index``), so the same
script runs under ``python -m openfl_api.simulate``, under the launcher, or rank by rank.
``--out DIR``: the backend writes ``DIR/<algorithm>.pt``. ``--kill``: once every federation has one
upload of version 2 accepted and the next one arriving, the backend SIGKILLs itself (each
federation checkpoints every version to ``DIR/<algorithm>.ckpt``; start it again with ``--resume``).
A federation that fails in a rank of its own process ends that process at once with code 1, naming
the algorithm: the federations missing it would otherwise wait for it until their timeouts.
"""

import argparse
import contextvars
import os
import signal
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

import strategies_federation as example  # noqa: E402

import openfl_api as ofl  # noqa: E402

parser = example.build_parser()
parser.add_argument("--out", required=True)
parser.add_argument("--kill", action="store_true")
parser.add_argument("--only", default="", help="comma-separated algorithms (default: all)")
args = parser.parse_args()
algorithms = [a for a in args.only.split(",") if a] or list(example.ALGORITHMS)
out = Path(args.out)
base = ofl.Address(args=args)


def address_of(index: int, algorithm: str) -> ofl.Address:
    parts = urlsplit(base.init_method)
    if parts.scheme == "tcp":
        init_method = f"tcp://{parts.hostname}:{parts.port + 1 + index}"
    else:
        init_method = f"{base.init_method}.{algorithm}"
    return ofl.Address(init_method=init_method, world_size=base.world_size, rank=base.rank,
                       group_name=base.group_name)


barrier = threading.Barrier(len(algorithms), timeout=120)


class KillAtVersion2(ofl.Step):
    """Backend: waits, at the second upload of version 2, for every federation to get there, then
    SIGKILLs the process: each one is killed with one upload accepted and not checkpointed."""

    roles = frozenset({"backend"})

    def before_upload(self, api, transfer):
        if api.version == 2 and api.accepted == 1:
            try:
                barrier.wait()
            finally:
                os.kill(os.getpid(), signal.SIGKILL)


failures = []


def one(index: int, algorithm: str) -> None:
    mine = argparse.Namespace(**vars(args))
    mine.algorithm = algorithm
    mine.save = str(out / f"{algorithm}.pt") if base.rank == 0 else None
    mine.checkpoint = str(out / f"{algorithm}.ckpt")
    mine.resume = mine.checkpoint if args.resume else None
    try:
        example.run(mine, address_of(index, algorithm), hooks=[KillAtVersion2()] if args.kill else [])
    except BaseException as exc:
        failures.append(f"{algorithm}: {type(exc).__name__}: {exc}")
        print(f"rank {base.rank} failed: {failures[-1]}", flush=True)
        if base.scheme != "memory":  # a process of its own: end it at once, as a federation missing it waits
            os._exit(1)


threads = [threading.Thread(target=contextvars.copy_context().run, args=(one, i, a), name=a)
           for i, a in enumerate(algorithms)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
if failures:
    raise SystemExit("failed: " + "; ".join(failures))
print(f"rank {base.rank}: {len(algorithms)} federations done", flush=True)
