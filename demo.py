"""The demo: one PyTorch training loop, run on every rank.

    python -m openfl_api.launch --nproc_per_node 3 --logdir logs demo.py
    python -m openfl_api.launch --nproc_per_node 4 --logdir logs demo.py --asynchronous

Rank 0 aggregates (FedAvg of every 2 uploads) and stops at version 3; ranks 1.. train a tiny
linear model on their own random data and exchange it through the backend.

With ``--asynchronous`` the same loop runs asynchronously (FedAsync; ``--buffer k`` aggregates
every k updates, FedBuff-style): downloads are answered at once, rank r takes 50 * r ms longer per
round than rank 1, and the backend logs the staleness and weight of each accepted update.
"""

import time

import torch

import openfl_api as ofl
from openfl_api import aggregate

ofl.logger.log_level("INFO")
parser = ofl.parser.build_parser()
parser.add_argument("--asynchronous", action="store_true", help="asynchronous FL (FedAsync / FedBuff)")
parser.add_argument("--buffer", type=int, default=1, help="asynchronous: updates per aggregation")
args = parser.parse_args()

mode = ofl.Asynchronous(alpha=0.6, staleness=aggregate.Polynomial(a=0.5)) if args.asynchronous else None
api = ofl.API(frontend=args.rank > 0, asynchronous=mode)
api.set_aggregate_triggers(ofl.AggregateCount(count=args.buffer if mode else max(1, args.world_size - 1)))
with ofl.StepAt(api):
    ofl.StopAtVersion(max_version=12 if mode else 3)
api.build_connection(address=ofl.Address(args=args))

torch.manual_seed(args.rank)
net = torch.nn.Linear(1, 1)
optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), optimizer)
api.set_state_dict(net.state_dict(keep_vars=True))

inputs = torch.randn(128, 1)
targets = 3 * inputs + 1
with api:
    api.run()  # backend: serve until StopAtVersion fires; frontend: return at once
    while api.download():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(inputs), targets)
        loss.backward()
        optimizer.step()
        if mode is not None:
            time.sleep(0.05 * args.rank)  # frontends of deliberately different speeds
        if not api.upload(num_samples=len(inputs), metrics={"loss": loss.item()}):
            break
        api.update_version()
api.finish()
print(f"rank {args.rank} ({api.nick_name}) finished at version {api.version}")
