"""The demo: one PyTorch training loop, run on every rank.

    python -m openfl_api.launch --nproc_per_node 3 --logdir logs demo.py

Rank 0 aggregates (FedAvg of every 2 uploads) and stops at version 3; ranks 1.. train a tiny
linear model on their own random data and exchange it through the backend.
"""

import torch

import openfl_api as ofl
from openfl_api import aggregate

ofl.logger.log_level("INFO")
args = ofl.parser.parse_args()

api = ofl.API(frontend=args.rank > 0)
api.set_aggregate_triggers(ofl.AggregateCount(count=max(1, args.world_size - 1)))
with ofl.StepAt(api):
    ofl.StopAtVersion(max_version=3)
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
        if not api.upload(num_samples=len(inputs), metrics={"loss": loss.item()}):
            break
        api.update_version()
api.finish()
print(f"rank {args.rank} ({api.nick_name}) finished at version {api.version}")
