"""A configurable federation script for the multi-process tests; run on every rank by the launcher.

Frontends train a 2-parameter model, or (--rogue) send tampered uploads first, or (--die_rank)
SIGKILL themselves mid-run, or (--pace) take that many seconds per round; --mark is a file a
frontend creates once an upload of its was accepted. With --protect_wire every pipe is sealed, and
(--wire_attack) rank 2 sends a tampered upload, one sealed with another key, or a replay of its
first upload, each straight on its pipe. The backend stops at
--max_version, or once the file --stop_file exists, and can write its final model and ledger to
--result.
"""

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch

import openfl_api as ofl
from openfl_api import aggregate

parser = ofl.parser.build_parser()
parser.add_argument("--count", type=int, default=2)
parser.add_argument("--max_version", type=int, default=3)
parser.add_argument("--die_rank", type=int, default=-1)
parser.add_argument("--rogue", action="store_true")
parser.add_argument("--constant", type=float, default=None)
parser.add_argument("--result", default=None)
parser.add_argument("--wait_for", default=None)
parser.add_argument("--pace", type=float, default=0.0)
parser.add_argument("--stop_file", default=None)
parser.add_argument("--mark", default=None)
parser.add_argument("--protect_wire", action="store_true")
parser.add_argument("--wire_attack", choices=["tamper", "wrong_key", "replay"], default=None)
args = parser.parse_args()
ofl.logger.log_level("DEBUG" if args.rogue else "INFO")

api = ofl.API(frontend=args.rank > 0, timeout=timedelta(seconds=60), connect_timeout=timedelta(seconds=60),
              transfer_timeout=timedelta(seconds=30), drain=timedelta(seconds=5),
              protect_wire=True if args.protect_wire else None)
api.set_aggregate_triggers(ofl.AggregateCount(count=args.count))
api.register_step(ofl.StopAtVersion(max_version=args.max_version))


class StopAtFile(ofl.Step):
    """Stop once the test creates the file ``path``."""

    roles = frozenset({"backend"})

    def __init__(self, path):
        self.path = Path(path)

    def at_loop(self, api):
        if self.path.exists():
            api.stop(f"{self.path.name} exists")

    after_aggregate = at_loop


if args.stop_file:
    api.register_step(StopAtFile(args.stop_file))
if args.address_file and args.rank == 0:
    api.build_connection(address_file=args.address_file)
else:
    api.build_connection(address=ofl.Address(args=args))

torch.manual_seed(0)
net = torch.nn.Linear(3, 1)
optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), optimizer)
api.set_state_dict(net.state_dict(keep_vars=True))


def wait_for_file(path):
    deadline = time.monotonic() + 60
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within 60 s")
        time.sleep(0.05)


def send_tampered(api):
    """Send bad uploads through the real pipe; check each is refused and the model is unchanged."""
    from openfl_api.payload import MAX_HEADER_BYTES, encode, parse_header
    from openfl_api.transport.base import Kind, Limits, Message

    state = api._shared_state()
    assert api.download()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    header, buffer = encode(state.upload_tensors(), state.upload_schema, kind="update", version=0,
                            sender="rogue", meta={"num_samples": 1, "metrics": {}})
    fields = parse_header(header)

    def edited(**change):
        copy = json.loads(json.dumps(fields))
        copy["tensors"][0].update(change)
        return json.dumps(copy).encode()

    nan = buffer.clone()
    nan[:4].view(torch.float32)[0] = float("nan")
    inf = buffer.clone()
    inf[:4].view(torch.float32)[0] = float("inf")
    cases = {
        "shape": (edited(shape=[3, 1]), buffer),
        "dtype": (edited(dtype="float16"), buffer),
        "size": (header, buffer[:-64]),
        "nan": (header, nan),
        "garbage": (b"{\"format\": 1, \"kind\": ", buffer),
        "name": (edited(name="bogus.weight"), buffer),
        "future": (json.dumps({**fields, "version": 99}).encode(), buffer),
        "inf": (header, inf),
    }
    outcome = {}
    for name, (bad_header, bad_buffer) in cases.items():
        reply = api._client._exchange(Message(Kind.UPLOAD, bad_header, bad_buffer),
                                      Limits(frozenset({Kind.ACK, Kind.END}), MAX_HEADER_BYTES, 0))
        ack = parse_header(reply.header)
        assert api.download()
        unchanged = all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        outcome[name] = {"accepted": ack["accepted"], "reason": ack["reason"], "unchanged": unchanged}
    # A header over the limit breaks the protocol: the backend closes the pipe without reading
    # it (the test checks its log), and this frontend joins again on its next call. Gloo tells a
    # closed pair only when the peer's process ends (a send waits for the peer to take it), so no
    # answer within a few seconds is the close.
    pipe = api._client._pipe
    try:
        pipe.send(Message(Kind.UPLOAD, b" " * (MAX_HEADER_BYTES + 1), None), timedelta(seconds=4))
        pipe.recv(Limits(frozenset({Kind.ACK, Kind.END, Kind.PING}), MAX_HEADER_BYTES, 0),
                  timedelta(seconds=4), timedelta(seconds=4), lambda n: torch.empty(n, dtype=torch.uint8))
        closed = False
    except ofl.TransportError:
        closed = True
    assert api.download()
    unchanged = all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    outcome["header too large"] = {"accepted": False, "reason": "pipe closed" if closed else "answered",
                                   "unchanged": unchanged}
    return outcome


def wire_attack(api, kind, recorded=None):
    """Send one bad message straight on the protected pipe; return whether the backend closed it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from openfl_api.payload import MAX_HEADER_BYTES, encode
    from openfl_api.transport.base import REPLIES, Kind, Limits, Message, Stream

    client = api._client
    pipe, inner = client._pipe, client._pipe._inner
    state = api._shared_state()
    forged = {name: torch.full_like(value, 1000.0) for name, value in state.upload_tensors().items()}
    header, buffer = encode(forged, state.upload_schema, kind="update", version=client.version, sender="rogue",
                            meta={"num_samples": 1000, "metrics": {}})
    timeout = timedelta(seconds=10)
    with client._beat.request():
        if kind == "replay":
            try:
                inner.send(recorded, timeout)
            except ofl.TransportError:
                return True  # refused before it was all sent
        else:
            if kind == "wrong_key":
                pipe._seal_with = AESGCM(os.urandom(32))
            else:
                send = inner.send

                def tampered(message, timeout):
                    sealed = [piece.clone() for piece in message.payload.make()]
                    sealed[0][5] ^= 1  # one byte of the sealed payload changes on the way
                    rows = message.payload.rows
                    send(Message(message.kind, message.header, Stream(message.payload.nbytes, rows,
                                                                      lambda: iter(sealed))), timeout)

                inner.send = tampered
            try:
                pipe.send(Message(Kind.UPLOAD, header, buffer), timeout)
            except ofl.TransportError:
                return True  # refused before it was all sent
            finally:
                inner.__dict__.pop("send", None)
        try:
            while pipe.recv(Limits(REPLIES | {Kind.PING, Kind.HEARTBEAT}, MAX_HEADER_BYTES, 0), timeout, timeout,
                            lambda n: torch.empty(n, dtype=torch.uint8)).kind in (Kind.PING, Kind.HEARTBEAT):
                pass
            return False
        except ofl.TransportError:
            return True


def record_uploads(api):
    """Keep the sealed form of each upload rank 2 sends, for --wire_attack replay."""
    from openfl_api.transport.base import Kind, Message, Stream

    inner, kept = api._client._pipe._inner, []
    send = inner.send

    def recording(message, timeout):
        if message.kind is Kind.UPLOAD:
            sealed = list(message.payload.make())
            message = Message(message.kind, message.header,
                              Stream(message.payload.nbytes, message.payload.rows, lambda: iter(sealed)))
            kept.append(message)
        send(message, timeout)

    inner.send = recording
    return kept


with api:
    api.run()
    attacked = None
    if args.wire_attack in ("tamper", "wrong_key") and args.rank == 2:
        assert api.download()
        before = {k: v.detach().clone() for k, v in net.state_dict().items()}
        attacked = wire_attack(api, args.wire_attack)
        assert api.download()  # joins again, with fresh keys
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    recorded = record_uploads(api) if args.wire_attack == "replay" and args.rank == 2 else None
    rounds = 0
    report = {}
    if args.rogue and args.rank > 0:
        report = send_tampered(api)
    if args.wait_for and args.rank > 0 and args.rank != args.die_rank:
        wait_for_file(args.wait_for)
    while api.download():
        if args.constant is not None:
            with torch.no_grad():
                for p in net.parameters():
                    p.fill_(args.constant)
        else:
            optimizer.zero_grad()
            net(torch.randn(16, 3)).pow(2).mean().backward()
            optimizer.step()
        if not api.upload(num_samples=16):
            break
        rounds += 1
        if recorded and attacked is None:
            attacked = wire_attack(api, "replay", recorded[0])
        if args.mark and api._client.ledger.count("uploads"):
            Path(args.mark).touch()  # this frontend has had an upload accepted
        time.sleep(args.pace)  # the time a round of training would take
        if args.rank == args.die_rank and rounds == 1:
            if args.wait_for:
                Path(args.wait_for).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        api.update_version()
api.finish()

if args.result:
    if args.rank == 0:
        result = {"version": api.version, "weight": net.weight.detach().tolist(),
                  "bias": net.bias.detach().tolist(), "totals": api._server.ledger.totals(),
                  "accepted": api._server.ledger.count("uploads"), "wire": dict(api._server.ledger.wire),
                  "reasons": dict(api._server.ledger.discard_reasons)}
    else:
        result = {"rounds": rounds, "accepted": api._client.ledger.count("uploads"), "tampered": report,
                  "closed by the backend": attacked}
    Path(f"{args.result}.{args.rank}").write_text(json.dumps(result))
