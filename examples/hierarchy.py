"""A federation of any depth from one script: the root, middle nodes (edges) and leaves.

    python -m openfl_api.launch --nproc_per_node 7 --logdir logs examples/hierarchy.py --fanout 2 2
    python -m openfl_api.simulate --nproc_per_node 7 examples/hierarchy.py --fanout 2 2
    python -m openfl_api.simulate --nproc_per_node 5 examples/hierarchy.py --fanout 4

``--fanout 2 2``: rank 0 is the root, ranks 1 and 2 are edges, ranks 3 .. 6 the leaves (two per
edge). Every edge uploads its two children's exact sum each time both have uploaded, and the root
aggregates its two edges; the final weights are the flat federation's (``--fanout 4``), bit for
bit. ``--topology FILE`` reads the tree from a topology file instead. ``--out FILE`` makes the root save its final state_dict there.
"""

import time
from datetime import timedelta

import torch

import openfl_api as ofl
from openfl_api import aggregate

ofl.logger.log_level("INFO")
parser = ofl.parser.build_parser()
parser.add_argument("--fanout", type=int, nargs="+", default=[2, 2], help="children per node, level by level")
parser.add_argument("--slow", type=float, default=0.0, help="seconds the last leaf sleeps per round")
parser.add_argument("--pace", type=float, nargs="+", default=[0.0], help="seconds each leaf sleeps per round, leaf by "
                    "leaf (the last value for the leaves after)")
parser.add_argument("--topology", default=None, help="a topology file (JSON), instead of --fanout")
parser.add_argument("--rounds", type=int, default=3, help="versions the root aggregates")
parser.add_argument("--out", default=None, help="root: save the final state_dict here")
parser.add_argument("--asynchronous", choices=["none", "root", "edges"], default="none",
                    help="which level serves its children asynchronously (the other stays synchronous)")
parser.add_argument("--checkpoint", default=None, help="folder: the root and every edge checkpoint each version "
                    "there (rank<N>.<version>) and resume from it when started again")
args = parser.parse_args()

topology = ofl.Topology.load(args.topology) if args.topology else ofl.Topology.tree(args.fanout)
up, down = topology.addresses(ofl.Address(args=args))
role = topology.role(args.rank)
leaves = [r for r in range(topology.world_size) if topology.role(r) == "leaf"]
timeouts = dict(connect_timeout=timedelta(seconds=60), timeout=timedelta(seconds=120))
checkpoint = None if args.checkpoint is None else f"{args.checkpoint}/rank{args.rank}"
asynchronous = {"root": "root", "edges": "edge"}.get(args.asynchronous)


def serving(this_role: str) -> dict:
    """The options of a backend API: asynchronous at the chosen level, resuming from its checkpoints."""
    mode = ofl.Asynchronous(min_frontends=len(topology.children(args.rank))) if asynchronous == this_role else None
    return dict(asynchronous=mode, resume=checkpoint, **timeouts)



def build() -> torch.nn.Module:
    """The same initial model on every rank, from a generator of its own (simulate's threads share torch's)."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return net


net = build()
state = net.state_dict(keep_vars=True)
if role == "edge":
    edge = ofl.Edge(parent=ofl.API(frontend=True, **timeouts), children=ofl.API(frontend=False, **serving("edge")))
    with ofl.StepAt(edge.children):
        ofl.AggregateCount(count=len(topology.children(args.rank)), checkpoint=checkpoint)
    edge.build_connection(parent=up, children=down)
    edge.set_state_dict(state, topology.aggregator(args.rank, aggregate.AverageAggregator(net.parameters()), state))
    with edge:
        edge.run()
    edge.finish()
    raise SystemExit(0)

api = ofl.API(frontend=True, **timeouts) if role == "leaf" else ofl.API(frontend=False, **serving("root"))
with ofl.StepAt(api):
    ofl.AggregateCount(count=len(topology.children(0)), checkpoint=checkpoint)
    ofl.StopAtVersion(max_version=args.rounds)
api.build_connection(address=down if role == "root" else up)
node = 0 if role == "root" else topology.parent(args.rank)
api.set_aggregator_and_optimizer(topology.aggregator(node, aggregate.AverageAggregator(net.parameters()), state))
api.set_state_dict(state)


class Answered(ofl.Step):
    """A leaf's line once its edge has answered an upload: ``upload()`` returns while the update
    travels, and ``after_upload`` fires when the answer comes (at the leaf's next call)."""

    roles = frozenset({"frontend"})

    def after_upload(self, api, transfer) -> None:
        verdict = "uploaded its update" if transfer.accepted else f"had its update discarded ({transfer.reason})"
        print(f"rank {args.rank} (leaf) {verdict} of version {transfer.version}", flush=True)


if role == "leaf":
    api.register_step(Answered())
    leaf = leaves.index(args.rank)  # the same leaf in every tree: its data and its sample count
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    samples = 16 + 8 * leaf
with api:
    api.run()
    while api.download():
        generator = torch.Generator().manual_seed(1000 * leaf + api.version)
        inputs = torch.randn(samples, 4, generator=generator)
        targets = inputs.sum(dim=1, keepdim=True) * (1 + leaf)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(inputs), targets).backward()
        optimizer.step()
        # a slow leaf: its edge (and the other edges, through the root) waits for it
        time.sleep(args.pace[min(leaf, len(args.pace) - 1)] + (args.slow if leaf == len(leaves) - 1 else 0.0))
        if not api.upload(num_samples=samples):
            break
        api.update_version()
api.finish()
if role == "root" and args.out:
    torch.save({name: t.detach().clone() for name, t in state.items()}, args.out)
print(f"rank {args.rank} ({role}) finished at version {api.version}")
