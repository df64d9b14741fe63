"""Start the ranks of a federation on this node and supervise them: ``python -m openfl_api.launch``.

The launcher starts ``--nproc_per_node`` processes that run the same script, tells each its rank
through environment variables, and watches them until every one has exited. Global rank 0 is the
backend (the aggregator); every other rank is a frontend. The script reads its rank with
``openfl_api.parser.parse_args()``, whose defaults come from the variables below.

Usage
-----

::

    python -m openfl_api.launch [options] script.py [script args ...]
    python -m openfl_api.launch [options] -m package.module [module args ...]
    python -m openfl_api.launch [options] --no_python program [program args ...]

Everything after the script (or module, or program) is passed to it unchanged. Every option written
with underscores is also accepted with hyphens: ``--nproc_per_node`` and ``--nproc-per-node``.

Options
-------

``--nproc_per_node N`` or ``--nproc_per_node N0,N1,...`` (default 1)
    Ranks to start on this node. On a single node (``--nnodes 1``) N >= 2: a federation needs the
    backend and at least one frontend, and a backend alone would wait for frontends forever, so
    N = 1 there, the default included, is a usage error. With ``--nnodes`` above 1, N >= 1: a node
    may run a single rank. A list gives one count per node, the same list on every node: with
    ``--nnodes 3 --nproc_per_node 1,4,4`` node 0 runs the backend alone and nodes 1 and 2 run four
    frontends each (ranks 1-4 and 5-8).
``--nnodes N`` (default 1)
    Nodes taking part; the world size is ``nnodes * nproc_per_node``, or the sum of the list. Run the
    launcher once per node, with the same options except ``--node_rank``.
``--node_rank R`` (default 0)
    This node's index, ``0 <= R < nnodes``. The node with rank 0 runs the backend.
``--master_addr HOST`` (default ``127.0.0.1``)
    Address of the node running the backend.
``--master_port PORT`` (default: a free port on ``master_addr``)
    Port of the backend, 1..65535. Required when ``nnodes > 1``, since every node must name the
    same port.
``--init_method URL`` (default: none)
    ``tcp://HOST:PORT`` or ``file:///PATH``, handed to every rank as ``OPENFL_INIT_METHOD``. Without
    it ranks connect through ``MASTER_ADDR``/``MASTER_PORT``. ``memory://`` connects ranks inside one
    process only, so the launcher, which starts a process per rank, refuses it.
``--logdir DIR`` (default: none)
    Write each rank's stdout and stderr to ``DIR/rank_{RANK}.log`` (created; truncated at start)
    instead of the console. When a rank fails, the end of its log is shown on stderr (see
    "Failure modes").
``--server_output``
    With ``--logdir``: rank 0's output also goes to the launcher's stdout.
``--record FILE`` (default: none)
    The backend writes the record of the run, one JSON line per event, to ``FILE`` (relative to
    the launcher's folder, which is every rank's), unless the script's ``API(record=...)`` names
    one; ``python -m openfl_api.plot FILE`` draws it. Handed to every rank as ``OPENFL_RECORD``.
``--tensorboard DIR`` (default: none)
    The backend also writes the record's scalars as TensorBoard event files to ``DIR`` (needs the
    ``tensorboard`` package). Handed to every rank as ``OPENFL_TENSORBOARD``.
``--grace SECONDS`` (default 30)
    How long to wait for the other ranks after the backend exited, and between the steps of a
    shutdown (SIGINT, SIGTERM, SIGKILL).
``-m``, ``--module``
    Run the script as a module, like ``python -m``.
``--no_python``
    Run the script as a program of its own instead of with ``sys.executable``.

Environment of each rank
------------------------

The launcher's environment, plus:

``RANK``
    Global rank: the ranks of the nodes before this one, plus ``local_rank``; 0 is the backend.
``LOCAL_RANK``
    Rank on this node, ``0 <= LOCAL_RANK < nproc_per_node``.
``WORLD_SIZE``
    ``nnodes * nproc_per_node``, or the sum of the per-node list.
``LOCAL_WORLD_SIZE``
    ``nproc_per_node``.
``MASTER_ADDR``, ``MASTER_PORT``
    Where the backend listens.
``OPENFL_INIT_METHOD``
    Only with ``--init_method``; otherwise it is removed, so that a stale value from the shell
    cannot send the ranks elsewhere.
``OPENFL_API_TOKEN``
    The admission token. Kept when the launcher's environment sets it; otherwise one random token
    per run (``secrets.token_hex(16)``), the same for every rank. With ``nnodes > 1`` it must be set,
    to the same value on every node.
``OPENFL_RECORD``, ``OPENFL_TENSORBOARD``
    Only with ``--record``, ``--tensorboard``.
``OPENFL_PROGRESS_FD``
    Rank 0 only, with ``--logdir``, when the launcher's stderr is a terminal: a file descriptor of
    that terminal, on which the backend draws its progress line (its own output goes to its log
    file). Removed otherwise.
``OMP_NUM_THREADS``
    ``1`` when ``nproc_per_node > 1`` and the launcher's environment does not set it, as
    ``torchrun`` does: several ranks each running one OpenMP thread per core overload the machine,
    and spinning OpenMP threads starve the pipes' I/O threads. Set it yourself to choose another
    value.
``TORCH_CPP_LOG_LEVEL``
    ``ERROR`` unless the launcher's environment sets it: torch's C++ warnings (a store connection
    retried while a backend restarts, with a C++ stack trace each) would bury openfl_api's own
    lines, which say what happened and what to do. Set it to ``WARNING`` to see them.

Python ranks run unbuffered (``python -u``), so their output appears as it is written. Each rank
runs in a session of its own: a Ctrl-C in the terminal reaches the launcher only, which forwards it.
On Linux each rank also dies with the launcher (see "Failure modes").

Failure modes
-------------

A frontend exits with a non-zero code or is killed by a signal
    The federation goes on: the launcher prints ``rank 2 exited with code -9 (SIGKILL)`` to stderr
    (with ``--logdir`` followed by the end of the rank's log, as the next entry says) and keeps
    waiting for the others.
A rank fails with ``--logdir``
    When a rank exits non-zero, or is killed by a signal the launcher did not send, the launcher
    shows the end of its log on stderr: its last 20 lines, taken from the log's last 8 KiB (a line
    cut by that bound is dropped, or kept behind ``...`` when it is the only one), each behind the
    rank's tag::

        [openfl_api.launch] rank 1 exited with code 1; the last 4 lines of its log logs/rank_1.log:
        [rank 1] Traceback (most recent call last):
        [rank 1]   File "train.py", line 12, in <module>
        [rank 1]     raise ValueError("boom")
        [rank 1] ValueError: boom

    Rank 0 with ``--server_output`` is the exception: its output is on the console already.
The backend (global rank 0) exits, whatever its code
    The launcher waits up to ``--grace`` seconds for the other ranks on this node, then sends them
    SIGTERM and, after another ``--grace``, SIGKILL, saying so each time: ``sending SIGTERM to ranks
    1, 2: still running 30s (--grace) after the backend (rank 0) exited``. Frontends normally leave
    within moments of the backend, so the wait is announced only when ranks are still running 2
    seconds after the backend exited and ``--grace`` is longer than that: ``ranks 1, 2 are still
    running 2s after the backend (rank 0) exited with code 0; sending them SIGTERM in 28s (--grace
    30) unless they exit first``. A run whose frontends exit within those 2 seconds prints nothing
    about the wait.
The launcher receives SIGINT (Ctrl-C) or SIGTERM
    It sends SIGINT to every rank still running, so that Python ranks get ``KeyboardInterrupt`` and
    can clean up; SIGTERM after ``--grace``; SIGKILL after another ``--grace``. Each signal goes to
    the frontends first and to the backend last: a backend stopped first ends the requests its
    frontends wait on, and a frontend that read that end before its own signal came would finish
    as if the federation had ended. Each further SIGINT
    or SIGTERM to the launcher takes the next step at once. When the backend's exit has already
    led to SIGTERM, the launcher goes on from there, with SIGKILL.
The launcher is killed with SIGKILL
    On Linux its ranks die with it. Each rank, before it runs the script, asks the kernel to send
    it SIGKILL when its parent, the launcher, dies (``prctl(PR_SET_PDEATHSIG)``, through ``ctypes``
    in a ``preexec_fn``): SIGKILL, because no one is left to escalate past a rank that ignores
    SIGTERM. A rank whose launcher died between the fork and that request finds that its parent
    changed and kills itself the same way, without running the script. Processes that a rank starts
    itself are not covered (their parent is the rank), nor is a set-user-ID, set-group-ID or
    file-capability program run with ``--no_python``, for which the kernel drops the request. On
    other platforms the ranks run on in their own sessions; stop each one by its process group,
    ``kill -- -PID`` with the rank's pid.

At the end the launcher prints a summary to stderr: each rank's exit status (``rank 2 (frontend)
exited with code -15 (SIGTERM), stopped by the launcher``), then

- ``failed ranks: 1``: the ranks that exited non-zero, or were killed by a signal, before the
  launcher had signalled them;
- ``stopped by the launcher: ranks 2, 3 (SIGTERM after the backend exited)``: the ranks the
  launcher signalled before they exited, whatever their exit code, with the last signal it sent
  them and why (one line per signal and reason);
- ``no rank failed`` in place of both, and only then, when every rank exited on its own with 0.

Exit codes
----------

- The backend's exit code when global rank 0 runs on this node; ``128 + N`` when it was killed by
  signal N, as shells report it. This holds also when the launcher stopped frontends that were
  still running ``--grace`` after the backend exited: the backend holds the federation's result
  and decides when the federation is over, so frontends that outlive it do not change the
  outcome. The summary lists them as stopped, so the case stays visible.
- On a node without the backend: 0 when every rank exited 0, else 1.
- 130 (SIGINT) or 143 (SIGTERM) when the launcher was interrupted before the backend had exited.
- 2 for a usage error, with a message saying what must hold and how to fix it.

Examples
--------

Three ranks on this machine (a backend and two frontends), one log file each::

    python -m openfl_api.launch --nproc_per_node 3 --logdir logs demo.py

The same, with the record of the run in ``run.jsonl`` and the progress line on the console::

    python -m openfl_api.launch --nproc_per_node 3 --record run.jsonl --logdir logs demo.py

The same, meeting through a shared file instead of a TCP port, with the backend on the console::

    python -m openfl_api.launch --nproc_per_node 3 --init_method file:///tmp/federation \\
        --logdir logs --server_output demo.py

Two nodes with two ranks each; run on both, with ``--node_rank 1`` on the second::

    export OPENFL_API_TOKEN=<the same 32 hex digits on both nodes>
    python -m openfl_api.launch --nnodes 2 --node_rank 0 --nproc_per_node 2 \\
        --master_addr 10.0.0.1 --master_port 29500 demo.py
"""

from __future__ import annotations

import signal
from typing import Optional, Sequence

from openfl_api.launch.config import LaunchConfig, parse_args
from openfl_api.launch.supervisor import Supervisor, say

__all__ = ["LaunchConfig", "parse_args", "launch", "main"]


def launch(config: LaunchConfig) -> int:
    """Start this node's ranks, supervise them until every one has exited, and return the exit code.

    Installs handlers for SIGINT and SIGTERM while it runs (so it must be called from the main
    thread) and restores the previous ones before returning. No rank outlives the call, even when
    it raises.

    Args:
        config: What to start; see :class:`LaunchConfig`.

    Returns:
        The exit code described in the module docstring's "Exit codes".
    """
    supervisor = Supervisor(config)
    first, last = config.first_rank, config.first_rank + config.nproc_per_node - 1
    ranks = f"rank {first}" if first == last else f"ranks {first}..{last}"
    meeting = (f"init_method {config.init_method}" if config.init_method is not None
               else f"master {config.master_addr}:{config.master_port}")
    say(f"starting {ranks} of world_size {config.world_size} ({meeting})")
    if config.logdir is not None:
        console = "; rank 0 also to this console" if config.server_output and first == 0 else ""
        say(f"each rank writes to {config.logdir / 'rank_{RANK}.log'}{console}")
    elif config.nproc_per_node > 1:
        say("all ranks share this console; pass --logdir DIR to keep each rank's output in its own file")
    previous = {sig: signal.signal(sig, supervisor.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.start()
        supervisor.supervise()
    finally:
        supervisor.kill_remaining()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    supervisor.summarize()
    return supervisor.exit_code()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the launcher on ``argv`` and return its exit code: parse, configure, launch."""
    return launch(parse_args(argv))
