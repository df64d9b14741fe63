"""A recorded federation for tests/distributed/test_records.py: two frontends train an MLP 12-6-1
on data that is a pure function of (rank, version), report the loss, and evaluate every version
(FederatedEvaluation); the backend checkpoints every version and records the run to --record.
--kill_backend_at V=N makes the backend SIGKILL itself at the N-th upload it receives in version V.
"""

import os
import signal
from datetime import timedelta

import torch

import openfl_api as ofl
from openfl_api import aggregate

parser = ofl.parser.build_parser()
parser.add_argument("--max_version", type=int, default=5)
parser.add_argument("--checkpoint", default=None)
parser.add_argument("--record", default=None)
parser.add_argument("--kill_backend_at", default="")
args = parser.parse_args()
ofl.logger.log_level("INFO")
torch.set_num_threads(1)

api = ofl.API(frontend=args.rank > 0, timeout=timedelta(seconds=90), connect_timeout=timedelta(seconds=60),
              drain=timedelta(seconds=10), resume=args.resume, reconnect=timedelta(seconds=60), record=args.record)
api.set_aggregate_triggers(ofl.AggregateCount(count=args.world_size - 1, checkpoint=args.checkpoint))
with ofl.StepAt(api):
    ofl.StopAtVersion(max_version=args.max_version)
    ofl.FederatedEvaluation(every=1)
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
optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), optimizer)
api.set_state_dict(net.state_dict(keep_vars=True))


def batch(version: int, rank: int, test: bool = False):
    data = torch.Generator().manual_seed(1000 * version + rank + (500 if test else 0))
    x = torch.randn(16, 12, generator=data)
    return x, x[:, :1].sin()


def test():
    x, y = batch(api.version, args.rank, test=True)
    return 16 + args.rank, {"loss": torch.nn.functional.mse_loss(net(x), y).item()}


with api:
    api.run()
    while api.download():
        if not api.evaluate(test):
            break
        x, y = batch(api.version, args.rank)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        optimizer.step()
        if not api.upload(num_samples=16 + args.rank, metrics={"loss": loss.item()}):
            break
        api.update_version()
api.finish()
