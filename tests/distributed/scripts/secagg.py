"""Secure aggregation across real processes (tests/distributed/test_secagg.py).

Every frontend adds ``0.01 * rank`` to each weight per version and uploads with ``num_samples =
rank``; the backend learns only the sum, and at the end checks its model against plain FedAvg of
those updates within secure aggregation's quantization step, then prints ``SECAGG OK``. With
``--dp`` the chain is Clip + SecAgg + GaussianNoise(0), the same numbers. With ``--tamper R`` every
share is needed (threshold 0.7 of 3 holders) and rank ``R`` flips a byte of the seed shares it sends
back in its first round: that round fails, its uploads are discarded, and the version's next round
gives the same numbers.
"""

from datetime import timedelta

import torch

import openfl_api as ofl
from openfl_api import aggregate
from openfl_api import transforms as T

parser = ofl.parser.build_parser()
parser.add_argument("--max_version", type=int, default=2)
parser.add_argument("--dp", action="store_true")
parser.add_argument("--tamper", type=int, default=0)
args = parser.parse_args()
ofl.logger.log_level("INFO")
torch.set_num_threads(1)

api = ofl.API(frontend=args.rank > 0, timeout=timedelta(seconds=60), connect_timeout=timedelta(seconds=60),
              drain=timedelta(seconds=10))
frontends = args.world_size - 1
api.set_aggregate_triggers(ofl.AggregateCount(count=frontends))
api.register_step(ofl.StopAtVersion(max_version=args.max_version))
secagg = T.SecAgg(clip_range=0.25, bits=16, deadline=timedelta(seconds=20), threshold=0.7 if args.tamper else 0.5)
if args.rank == args.tamper > 0:
    from openfl_api.transforms.secagg import SecAggClient

    unmask, tampered = SecAggClient.unmask, []

    def tampering_unmask(self, context):
        if not tampered:
            tampered.append(context["round"])
            context["held"] = {d: (s, bytes([b[0] ^ 1]) + b[1:]) for d, (s, b) in context["held"].items()}
        unmask(self, context)

    SecAggClient.unmask = tampering_unmask
api.set_upload_transforms(*([T.Clip(10.0), secagg, T.GaussianNoise(0.0)] if args.dp else [secagg]))
api.build_connection(address=ofl.Address(args=args))

net = torch.nn.Linear(8, 4)
with torch.no_grad():
    net.weight.copy_(torch.arange(32.0).reshape(4, 8) / 100)
    net.bias.zero_()
start = {k: v.detach().clone() for k, v in net.state_dict().items()}
api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()))
api.set_state_dict(net.state_dict(keep_vars=True))

with api:
    api.run()
    while api.download():
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * args.rank)
        if not api.upload(num_samples=args.rank):
            break
        api.update_version()
api.finish()

if args.rank == 0:
    ranks = range(1, frontends + 1)
    mean_step = sum(0.01 * r * r for r in ranks) / sum(ranks)
    step = secagg.step(0.25)
    for name, value in net.state_dict().items():
        error = float((value.double() - (start[name].double() + args.max_version * mean_step)).abs().max())
        assert error < args.max_version * step + 1e-6, (name, error, step)
    print(f"SECAGG OK version {api.version}", flush=True)
