"""A deterministic federation for the bit-for-bit tests (tests/distributed/test_exact.py).

An MLP 12-6-1 with tanh, trained with SGD (lr 0.05, --momentum) on data that is a pure function of
(rank, version): any run of the same settings must end with the same weights, bit for bit,
whatever the arrival order of the uploads (--delay R=S,... makes rank R sleep S seconds before
each upload), the stop and resume in between (--max_version, --resume), or a SIGKILL of the
backend (--kill_backend_at V=N: at the N-th upload it receives in version V, before judging it).
"""

import os
import signal
import time
from datetime import timedelta

import torch

import openfl_api as ofl
from openfl_api import aggregate

parser = ofl.parser.build_parser()
parser.add_argument("--count", type=int, default=4)
parser.add_argument("--max_version", type=int, default=8)
parser.add_argument("--momentum", type=float, default=0.0)
parser.add_argument("--checkpoint", default=None)
parser.add_argument("--result", default=None)
parser.add_argument("--delay", default="")
parser.add_argument("--kill_backend_at", default="")
parser.add_argument("--log", default="INFO")
args = parser.parse_args()
ofl.logger.log_level(args.log)
torch.set_num_threads(1)

api = ofl.API(frontend=args.rank > 0, timeout=timedelta(seconds=90), connect_timeout=timedelta(seconds=60),
              drain=timedelta(seconds=10), resume=args.resume, reconnect=timedelta(seconds=60))
api.set_aggregate_triggers(ofl.AggregateCount(count=args.count, checkpoint=args.checkpoint))
api.register_step(ofl.StopAtVersion(max_version=args.max_version))
if args.kill_backend_at:
    kill_version, kill_upload = (int(v) for v in args.kill_backend_at.split("="))

    class KillBackendAt(ofl.Step):
        roles = frozenset({"backend"})
        seen = 0

        def before_upload(self, api, transfer):
            if api.version == kill_version:
                self.seen += 1
                if self.seen == kill_upload:
                    os.kill(os.getpid(), signal.SIGKILL)

    api.register_step(KillBackendAt())
api.build_connection(address=ofl.Address(args=args))

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=args.momentum)
api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), optimizer)
api.set_state_dict(net.state_dict(keep_vars=True))
delays = {int(r): float(s) for r, s in (item.split("=") for item in args.delay.split(",") if item)}

with api:
    api.run()
    while api.download():
        data = torch.Generator().manual_seed(1000 * api.version + args.rank)
        x = torch.randn(16, 12, generator=data)
        y = x[:, :1].sin()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
        time.sleep(delays.get(args.rank, 0.0))
        if not api.upload(num_samples=16 + args.rank):
            break
        api.update_version()
api.finish()

if args.result and args.rank == 0:
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, args.result)
