"""Admission under a low file descriptor limit: rank 0 runs a Lobby, ranks 1.. join it.

Run by the launcher under a small ``ulimit -n``. Rank 0 waits until every frontend was admitted or
refused, writes both lists to ``--result``, then lets the frontends go by setting ``done`` in the
store. Admitted frontends hold their pipes until then, so the backend's descriptors stay in use
while the others join; every frontend writes its outcome to ``--result.<rank>``.
"""

import json
import os
import queue
from datetime import timedelta
from pathlib import Path

import openfl_api as ofl
from openfl_api.errors import AdmissionError
from openfl_api.transport.rendezvous import Lobby, join, token_from
from openfl_api.transport.store import open_store

parser = ofl.parser.build_parser()
parser.add_argument("--result", required=True)
parser.add_argument("--pid_dir", default=None, help="write this rank's pid there, so a test can reap it")
args = parser.parse_args()
if args.pid_dir:
    (Path(args.pid_dir) / f"pid_{args.rank}").write_text(str(os.getpid()))
ofl.logger.log_level("INFO")

address = ofl.Address(args=args)
wait = timedelta(seconds=120)
store = open_store(address, backend=args.rank == 0, timeout=wait)
if args.rank == 0:
    outcomes: "queue.Queue" = queue.Queue()
    lobby = Lobby(address, store, token_from(None), wait, nick_name="backend",
                  on_admit=lambda pipe, peer: outcomes.put(("admitted", peer.rank, pipe)),
                  on_refuse=lambda rank, reason: outcomes.put(("refused", rank, reason)))
    results = [outcomes.get(timeout=wait.total_seconds()) for _ in range(address.world_size - 1)]
    store.set("done", "1")
    Path(args.result).write_text(json.dumps({
        "admitted": sorted(rank for kind, rank, _ in results if kind == "admitted"),
        "refused": {rank: reason for kind, rank, reason in results if kind == "refused"},
    }))
    lobby.close()
    for kind, _, pipe in results:
        if kind == "admitted":
            pipe.close()
else:
    try:
        pipe, _, _ = join(address, store, token_from(None), f"rank{args.rank}", wait)
    except AdmissionError as exc:
        Path(f"{args.result}.{args.rank}").write_text(json.dumps({"refused": str(exc)}))
    else:
        Path(f"{args.result}.{args.rank}").write_text(json.dumps({"admitted": True}))
        store.wait(["done"], wait)
        pipe.close()
