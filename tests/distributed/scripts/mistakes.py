"""A federation with a switch for each ordinary mistake, run on every rank by the launcher (or by hand).

Every rank trains a small MLP one step per version. Switches: --count (AggregateCount), --crash_rank
(that frontend exits at once), --small_rank (that frontend builds a model with a smaller hidden
layer), --late_rank/--late (that frontend starts late), --asynchronous, --status (seconds between
status lines), --connect and --reconnect (the API's connect_timeout and reconnect, in seconds).
"""

import sys
import time
from datetime import timedelta

import torch

import openfl_api as ofl
from openfl_api import aggregate

parser = ofl.parser.build_parser()
parser.add_argument("--count", type=int, default=2)
parser.add_argument("--max_version", type=int, default=3)
parser.add_argument("--crash_rank", type=int, default=-1)
parser.add_argument("--small_rank", type=int, default=-1)
parser.add_argument("--late_rank", type=int, default=-1)
parser.add_argument("--late", type=float, default=0.0)
parser.add_argument("--asynchronous", action="store_true")
parser.add_argument("--status", type=float, default=1.0)
parser.add_argument("--connect", type=float, default=60.0)
parser.add_argument("--reconnect", type=float, default=60.0)
args = parser.parse_args()
ofl.logger.log_level("INFO")

if args.rank == args.crash_rank:
    sys.exit(3)
if args.rank == args.late_rank:
    time.sleep(args.late)

mode = ofl.Asynchronous(alpha=0.5) if args.asynchronous else None
api = ofl.API(frontend=args.rank > 0, asynchronous=mode, status_interval=timedelta(seconds=args.status),
              connect_timeout=timedelta(seconds=args.connect), reconnect=timedelta(seconds=args.reconnect),
              timeout=timedelta(seconds=120), drain=timedelta(seconds=5))
api.set_aggregate_triggers(ofl.AggregateCount(count=args.count))
api.register_step(ofl.StopAtVersion(max_version=args.max_version))
api.build_connection(address=ofl.Address(args=args))

torch.manual_seed(0)
hidden = 3 if args.rank == args.small_rank else 6
net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), optimizer)
api.set_state_dict(net.state_dict(keep_vars=True))

x = torch.randn(16, 4, generator=torch.Generator().manual_seed(args.rank))
with api:
    api.run()
    while api.download():
        optimizer.zero_grad()
        net(x).pow(2).mean().backward()
        optimizer.step()
        if not api.upload(num_samples=16):
            break
        api.update_version()
        time.sleep(0.05)
api.finish()
