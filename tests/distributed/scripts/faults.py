"""A federation script for the fault tests (tests/distributed/test_faults.py), run on every rank.

Frontends train deterministically: the batch of version ``v`` on rank ``r`` is drawn with seed
``1000 * v + r``, so a run is reproducible whatever the timing, and a resumed run can be compared
bit for bit with an uninterrupted one. Faults are injected on purpose:

- ``--kill_mid_upload R``: rank R SIGKILLs itself while its first upload is on the wire;
- ``--kill_after_upload R``: rank R SIGKILLs itself as soon as its first ``upload()`` has returned
  and the upload's payload is on its way (a pipelined upload, sent by the frontend's I/O thread);
- ``--hang_mid_upload R``: rank R stops itself (SIGSTOP) while its first upload is on the wire;
- ``--die_waiting R``: rank R SIGKILLs itself after its first upload, while its download waits;
- ``--kill_backend_at K``: the backend SIGKILLs itself at the first upload of version K, with
  checkpoint K on disk and version K + 1 not yet aggregated;
- ``--delay R=S,...``: rank R sleeps S seconds per round (frontends of different speeds).
"""

import json
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

import openfl_api as ofl
from openfl_api import aggregate

parser = ofl.parser.build_parser()
parser.add_argument("--count", type=int, default=2)
parser.add_argument("--max_version", type=int, default=3)
parser.add_argument("--big", type=int, default=0, help="floats in an extra parameter (a large payload)")
parser.add_argument("--asynchronous", choices=["", "constant", "polynomial", "hinge"], default="")
parser.add_argument("--alpha", type=float, default=0.6)
parser.add_argument("--checkpoint", default=None)
parser.add_argument("--result", default=None)
parser.add_argument("--kill_mid_upload", type=int, default=-1)
parser.add_argument("--kill_after_upload", type=int, default=-1)
parser.add_argument("--hang_mid_upload", type=int, default=-1)
parser.add_argument("--die_waiting", type=int, default=-1)
parser.add_argument("--kill_backend_at", type=int, default=-1,
                    help="the backend SIGKILLs itself at the first upload it receives at this version")
parser.add_argument("--delay", default="")
parser.add_argument("--transfer_timeout", type=float, default=30.0)
parser.add_argument("--max_rounds", type=int, default=10**6)
args = parser.parse_args()
ofl.logger.log_level("INFO")
torch.set_num_threads(1)

mode = None
if args.asynchronous:
    staleness = {"constant": aggregate.Constant(), "polynomial": aggregate.Polynomial(0.5),
                 "hinge": aggregate.Hinge(10.0, 2)}[args.asynchronous]
    mode = ofl.Asynchronous(alpha=args.alpha, staleness=staleness, max_staleness=8)
api = ofl.API(frontend=args.rank > 0, timeout=timedelta(seconds=90), connect_timeout=timedelta(seconds=60),
              transfer_timeout=timedelta(seconds=args.transfer_timeout), drain=timedelta(seconds=10),
              asynchronous=mode, resume=args.resume, reconnect=timedelta(seconds=60))
api.set_aggregate_triggers(ofl.AggregateCount(count=args.count, checkpoint=args.checkpoint))
api.register_step(ofl.StopAtVersion(max_version=args.max_version))


class KillBackendAt(ofl.Step):
    """Die at a known point: version k's checkpoint is on disk (written when k was aggregated),
    and version k + 1 is not aggregated yet, whatever the speed of the machine."""

    roles = frozenset({"backend"})

    def before_upload(self, api, transfer):
        if api.version == args.kill_backend_at:
            os.kill(os.getpid(), signal.SIGKILL)


if args.kill_backend_at >= 0:
    api.register_step(KillBackendAt())
api.build_connection(address=ofl.Address(args=args))


class Net(torch.nn.Module):
    def __init__(self, big: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        if big:
            self.big = torch.nn.Parameter(torch.zeros(big))


torch.manual_seed(0)
net = Net(args.big)
optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), optimizer)
api.set_state_dict(net.state_dict(keep_vars=True))
delays = {int(r): float(s) for r, s in (item.split("=") for item in args.delay.split(",") if item)}


def payload_posted(fault: int = 0) -> threading.Event:
    """An event set once gloo was given the payload of a message this process sends (its upload).

    With ``fault`` (a signal), the sending thread delivers it to this process right then: the payload
    is on the wire, not yet through it.
    """
    from openfl_api.transport.gloo import GlooPipe

    posted = threading.Event()
    real_post = GlooPipe._post

    def post(self, send, tensor, what):
        work = real_post(self, send, tensor, what)
        if send and tensor.numel() > (1 << 20):
            posted.set()
            if fault:
                os.kill(os.getpid(), fault)
        return work

    GlooPipe._post = post
    return posted


rounds = 0
with api:
    api.run()
    while rounds < args.max_rounds and api.download():
        torch.manual_seed(1000 * api.version + args.rank)
        optimizer.zero_grad()
        x = torch.randn(32, 8)
        net.fc(x).sub(x[:, :4]).pow(2).mean().backward()
        optimizer.step()
        time.sleep(delays.get(args.rank, 0.0))
        first = rounds == 0  # the faults strike the first upload
        if first and args.rank == args.kill_mid_upload:
            payload_posted(signal.SIGKILL)
        if first and args.rank == args.hang_mid_upload:
            payload_posted(signal.SIGSTOP)
        posted = payload_posted() if first and args.rank == args.kill_after_upload else None
        if not api.upload(num_samples=32, metrics={"round": rounds}):
            break
        if posted is not None:  # upload() has returned; its 64 MB leave from the I/O thread
            posted.wait(30)
            os.kill(os.getpid(), signal.SIGKILL)
        rounds += 1
        if args.rank == args.die_waiting:
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
        api.update_version()
api.finish()

if args.result:
    result = {"version": api.version, "rounds": rounds}
    if args.rank == 0:
        result["totals"] = api._server.ledger.totals()
        result["reasons"] = dict(api._server.ledger.discard_reasons)
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, f"{args.result}.pt")
    Path(f"{args.result}.{args.rank}.json").write_text(json.dumps(result))
