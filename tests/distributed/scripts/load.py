"""Synchronous FedAvg of a tiny MLP for the load test; run on every rank by the launcher.

Every upload of a version must arrive before it is aggregated (``AggregateCount(count=--count)``),
so the backend's log shows whether each version really had every frontend in it.

Frontends step their parameters by hand instead of with ``torch.optim``: building the first
optimizer of a process imports ``torch._dynamo`` (about 2 s of CPU), a cost that 33 processes on
a 2-CPU machine pay in series and that has nothing to do with the federation under test. For
the same reason the objects of the imports are frozen out of the garbage collector: otherwise the
interpreter's last collections at exit walk them all, 0.5-1 s of CPU per process.
"""

import gc
import os
from datetime import timedelta
from pathlib import Path

import torch

import openfl_api as ofl
from openfl_api import aggregate

parser = ofl.parser.build_parser()
parser.add_argument("--count", type=int, required=True)
parser.add_argument("--max_version", type=int, default=3)
parser.add_argument("--timeout", type=float, default=300.0, help="seconds for every wait of the API")
parser.add_argument("--pid_dir", default=None, help="write this rank's pid there, so a test can reap it")
args = parser.parse_args()
if args.pid_dir:
    (Path(args.pid_dir) / f"pid_{args.rank}").write_text(str(os.getpid()))
ofl.logger.log_level("INFO")
torch.set_num_threads(1)

wait = timedelta(seconds=args.timeout)
api = ofl.API(frontend=args.rank > 0, timeout=wait, connect_timeout=wait, transfer_timeout=wait,
              drain=timedelta(seconds=30))
api.set_aggregate_triggers(ofl.AggregateCount(count=args.count))
api.register_step(ofl.StopAtVersion(max_version=args.max_version))
api.build_connection(address=ofl.Address(args=args))

torch.manual_seed(args.rank)
net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
api.set_state_dict(net.state_dict(keep_vars=True))
gc.freeze()  # everything imported and built so far lives until exit

inputs = torch.randn(64, 8)
targets = inputs.sum(dim=1, keepdim=True)
rounds = 0
with api:
    api.run()
    while api.download():
        net.zero_grad()
        loss = torch.nn.functional.mse_loss(net(inputs), targets)
        loss.backward()
        with torch.no_grad():
            for param in net.parameters():
                param -= 0.01 * param.grad
        if not api.upload(num_samples=len(inputs), metrics={"loss": loss.item()}):
            break
        rounds += 1
        api.update_version()
api.finish()
print(f"rank {args.rank} finished at version {api.version} after {rounds} uploads")
