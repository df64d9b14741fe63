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

``--nproc_per_node N`` (default 1)
    Ranks to start on this node. On a single node (``--nnodes 1``) N >= 2: a federation needs the
    backend and at least one frontend, and a backend alone would wait for frontends forever, so
    N = 1 there, the default included, is a usage error. With ``--nnodes`` above 1, N >= 1: a node
    may run a single rank.
``--nnodes N`` (default 1)
    Nodes taking part; the world size is ``nnodes * nproc_per_node``. Run the launcher once per node,
    with the same options except ``--node_rank``.
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
    Global rank, ``node_rank * nproc_per_node + local_rank``; 0 is the backend.
``LOCAL_RANK``
    Rank on this node, ``0 <= LOCAL_RANK < nproc_per_node``.
``WORLD_SIZE``
    ``nnodes * nproc_per_node``.
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
``OMP_NUM_THREADS``
    ``1`` when ``nproc_per_node > 1`` and the launcher's environment does not set it, as
    ``torchrun`` does: several ranks each running one OpenMP thread per core overload the machine,
    and spinning OpenMP threads starve the pipes' I/O threads. Set it yourself to choose another
    value.

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
    can clean up; SIGTERM after ``--grace``; SIGKILL after another ``--grace``. Each further SIGINT
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

The same, meeting through a shared file instead of a TCP port, with the backend on the console::

    python -m openfl_api.launch --nproc_per_node 3 --init_method file:///tmp/federation \\
        --logdir logs --server_output demo.py

Two nodes with two ranks each; run on both, with ``--node_rank 1`` on the second::

    export OPENFL_API_TOKEN=<the same 32 hex digits on both nodes>
    python -m openfl_api.launch --nnodes 2 --node_rank 0 --nproc_per_node 2 \\
        --master_addr 10.0.0.1 --master_port 29500 demo.py
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from openfl_api.errors import ConfigurationError

__all__ = ["LaunchConfig", "parse_args", "launch", "main"]

TOKEN_VAR = "OPENFL_API_TOKEN"
INIT_METHOD_VAR = "OPENFL_INIT_METHOD"

_PREFIX = "[openfl_api.launch]"
# Polling, as torchelastic's agent does, keeps the loop portable and lets the signal handlers run
# on the main thread within one interval, whichever thread the kernel delivered the signal to.
_POLL_INTERVAL_S = 0.1
_SHUTDOWN_STEPS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
# Frontends normally exit within moments of the backend; only those still running this long after
# it are worth a line on the console.
_GRACE_NOTICE_S = 2.0
# How much of a failed rank's log the launcher shows: enough for a traceback's end, bounded in bytes
# so that a rank that wrote one endless line cannot flood the console.
_LOG_TAIL_LINES = 20
_LOG_TAIL_BYTES = 8192
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# SIGKILL rather than SIGTERM: once the launcher is dead no one is left to escalate past a rank
# that ignores or outlasts SIGTERM.
_PARENT_DEATH_SIGNAL = signal.SIGKILL


@dataclass(frozen=True)
class LaunchConfig:
    """What to start on this node and how to supervise it; validated on construction.

    Attributes:
        script: Path of the script, or the module with ``run_module``, or the program with
            ``no_python``.
        master_port: Port of the backend on ``master_addr``.
        token: Admission token handed to every rank as ``OPENFL_API_TOKEN``.
        script_args: Arguments passed to the script unchanged.
        nproc_per_node: Ranks to start on this node.
        nnodes: Nodes taking part.
        node_rank: Index of this node; node 0 runs the backend.
        master_addr: Address of the node running the backend.
        init_method: ``tcp://`` or ``file://`` URL handed to the ranks, or None.
        logdir: Folder for one log file per rank, or None for the console.
        server_output: With ``logdir``, also copy rank 0's output to the console.
        grace: Wait for the other ranks after the backend exited, and between shutdown steps.
        run_module: Run ``script`` as a module (``python -m``).
        no_python: Run ``script`` as a program of its own.

    Raises:
        ConfigurationError: A value is out of range, the script is missing, or the init method
            cannot reach separate processes.
    """

    script: str
    master_port: int
    token: str = field(repr=False)
    script_args: tuple[str, ...] = ()
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    init_method: Optional[str] = None
    logdir: Optional[Path] = None
    server_output: bool = False
    grace: timedelta = timedelta(seconds=30)
    run_module: bool = False
    no_python: bool = False

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigurationError(f"nnodes must be >= 1, got {self.nnodes}; pass --nnodes 1 or more")
        if self.nnodes == 1 and self.nproc_per_node < 2:
            # A backend alone would wait for frontends that never come.
            raise ConfigurationError(
                f"nproc_per_node must be >= 2 when nnodes is 1, got {self.nproc_per_node}; a federation "
                "needs the backend and at least one frontend: pass --nproc_per_node 2 or more"
            )
        if self.nproc_per_node < 1:
            raise ConfigurationError(
                f"nproc_per_node must be >= 1, got {self.nproc_per_node}; pass --nproc_per_node 1 or more"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigurationError(
                f"node_rank must satisfy 0 <= node_rank < nnodes, got node_rank {self.node_rank} with "
                f"nnodes {self.nnodes}; number the nodes 0..{self.nnodes - 1} with --node_rank"
            )
        if not 1 <= self.master_port <= 65535:
            raise ConfigurationError(
                f"master_port must be in 1..65535, got {self.master_port}; pass a free port such as "
                "--master_port 29500, or leave it out on a single node to get a free one"
            )
        if self.grace < timedelta(0):
            raise ConfigurationError(
                f"grace must be >= 0 seconds, got {self.grace.total_seconds()}; pass --grace 0 or more"
            )
        if not self.token:
            raise ConfigurationError(
                "token must not be empty: every rank presents it to the backend; pass one such as "
                "secrets.token_hex(16)"
            )
        if self.server_output and self.logdir is None:
            raise ConfigurationError(
                "--server_output copies rank 0's log file to the console, so it needs --logdir; "
                "without --logdir every rank already writes to the console"
            )
        if self.init_method is not None:
            _check_init_method(self.init_method, self.world_size)
        self._check_script()

    @property
    def world_size(self) -> int:
        """Ranks in the whole federation: ``nnodes * nproc_per_node``."""
        return self.nnodes * self.nproc_per_node

    def _check_script(self) -> None:
        if self.run_module and self.no_python:
            raise ConfigurationError("-m and --no_python exclude each other; pass at most one")
        if self.no_python:
            if shutil.which(self.script) is None:
                raise ConfigurationError(
                    f"program {self.script!r} was not found or is not executable; give its path, or "
                    "drop --no_python to run a Python script"
                )
        elif not self.run_module and not Path(self.script).is_file():
            raise ConfigurationError(
                f"script {self.script!r} does not exist (looked in {Path.cwd()}); give the path of a "
                "Python file, or pass -m to run a module"
            )


def _check_init_method(init_method: str, world_size: int) -> None:
    """Raise ConfigurationError unless ``init_method`` lets ``world_size`` processes meet."""
    parts = urlsplit(init_method)
    if parts.scheme == "memory":
        raise ConfigurationError(
            f"init_method {init_method!r} connects ranks inside one process only, but the launcher "
            f"starts {world_size} processes; use tcp://HOST:PORT or file:///PATH"
        )
    elif parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or not port:
            raise ConfigurationError(
                f"init_method {init_method!r} must name a host and a port in 1..65535, "
                "as tcp://10.0.0.1:29500"
            )
    elif parts.scheme == "file":
        if not parts.path:
            raise ConfigurationError(
                f"init_method {init_method!r} must name a file, as file:///tmp/federation"
            )
    else:
        raise ConfigurationError(
            f"init_method must start with tcp:// or file://, got {init_method!r}; e.g. "
            "--init_method tcp://10.0.0.1:29500 or --init_method file:///tmp/federation"
        )


def _free_port(host: str) -> int:
    """Return a port on ``host`` that is free now, found by binding port 0."""
    try:
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            return int(probe.getsockname()[1])
    except OSError as error:
        raise ConfigurationError(
            f"could not find a free port on master_addr {host!r} ({error}); pass an address of this "
            "machine with --master_addr, or a port with --master_port"
        ) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openfl_api.launch",
        description="Start the ranks of a federation on this node and supervise them. "
        "Rank 0 is the backend, every other rank a frontend. "
        "See the module docstring of openfl_api.launch for the full manual.",
    )
    parser.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=1,
                        help="ranks to start on this node (default 1; at least 2 when nnodes is 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes taking part (default 1)")
    parser.add_argument("--node_rank", "--node-rank", type=int, default=0,
                        help="index of this node, 0 <= node_rank < nnodes (default 0)")
    parser.add_argument("--master_addr", "--master-addr", default="127.0.0.1",
                        help="address of the node running the backend (default 127.0.0.1)")
    parser.add_argument("--master_port", "--master-port", type=int, default=None,
                        help="port of the backend (default: a free port; required when nnodes > 1)")
    parser.add_argument("--init_method", "--init-method", default=None,
                        help="tcp://HOST:PORT or file:///PATH, given to ranks as OPENFL_INIT_METHOD")
    parser.add_argument("--logdir", type=Path, default=None,
                        help="write each rank's output to LOGDIR/rank_{RANK}.log")
    parser.add_argument("--server_output", "--server-output", action="store_true",
                        help="with --logdir, also show rank 0's output on the console")
    parser.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                        help="wait after the backend exited and between shutdown steps (default 30)")
    parser.add_argument("-m", "--module", dest="run_module", action="store_true",
                        help="run the script as a module, like python -m")
    parser.add_argument("--no_python", "--no-python", action="store_true",
                        help="run the script as a program of its own, without the Python interpreter")
    parser.add_argument("script", help="the script (or module, or program) every rank runs")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def _config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> LaunchConfig:
    """Build the LaunchConfig from parsed arguments, choosing the port and the token."""
    if args.nnodes > 1 and args.master_port is None:
        raise ConfigurationError(
            f"--master_port is required when nnodes > 1 (got --nnodes {args.nnodes}): every node must "
            "reach the backend on the same port; pass e.g. --master_port 29500 on every node"
        )
    if not math.isfinite(args.grace):
        raise ConfigurationError(
            f"--grace must be a finite number of seconds, got {args.grace}; pass e.g. --grace 30"
        )
    token = environ.get(TOKEN_VAR, "")
    if not token:
        if args.nnodes > 1:
            raise ConfigurationError(
                f"{TOKEN_VAR} must be set when nnodes > 1 (got --nnodes {args.nnodes}): ranks on "
                "different nodes must share one token; export the same value on every node, e.g. "
                f"export {TOKEN_VAR}=$(python -c 'import secrets; print(secrets.token_hex(16))')"
            )
        token = secrets.token_hex(16)
    master_port = args.master_port if args.master_port is not None else _free_port(args.master_addr)
    return LaunchConfig(
        script=args.script,
        master_port=master_port,
        token=token,
        script_args=tuple(args.script_args),
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        init_method=args.init_method,
        logdir=args.logdir,
        server_output=args.server_output,
        grace=timedelta(seconds=args.grace),
        run_module=args.run_module,
        no_python=args.no_python,
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> LaunchConfig:
    """Parse the command line into a validated LaunchConfig; exit with code 2 on a usage error.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The configuration to pass to :func:`launch`.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return _config_from_args(args, os.environ)
    except ConfigurationError as error:
        parser.error(str(error))


def _describe(code: int) -> str:
    """Return ``"3"`` for an exit code and ``"-9 (SIGKILL)"`` for a signal, as Popen reports them."""
    if code >= 0:
        return str(code)
    try:
        return f"{code} ({signal.Signals(-code).name})"
    except ValueError:
        return str(code)


def _say(message: str) -> None:
    print(f"{_PREFIX} {message}", file=sys.stderr, flush=True)


def _log_tail(path: Path) -> list[str]:
    """Return the last lines of the file at ``path``: at most _LOG_TAIL_LINES, from its last _LOG_TAIL_BYTES.

    The first line read is cut when the file is longer than the bound: it is dropped, or kept behind
    ``...`` when it is the only line.
    """
    with path.open("rb") as log:
        start = max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES)
        log.seek(start)
        lines = log.read(_LOG_TAIL_BYTES).decode(errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:] if len(lines) > 1 else ["..." + lines[0]]
    return lines[-_LOG_TAIL_LINES:]


def _parent_death_hook(launcher_pid: int) -> Optional[Callable[[], None]]:
    """Return a ``preexec_fn`` that makes a rank die with the launcher, or None off Linux.

    The hook runs in the child between fork and exec. It asks the kernel for SIGKILL when the parent
    dies (``prctl(PR_SET_PDEATHSIG)``), then checks that the parent is still ``launcher_pid``: a
    launcher that died before the request was made is caught there, and the child kills itself
    with the same signal instead of running the script.

    Args:
        launcher_pid: The launcher's pid, ``os.getpid()`` in the launcher.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Resolved here, in the launcher: loading a library in the child between fork and exec is unsafe.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def die_with_launcher() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(_PARENT_DEATH_SIGNAL), 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}")
        if os.getppid() != launcher_pid:
            os.kill(os.getpid(), _PARENT_DEATH_SIGNAL)

    return die_with_launcher


def _tee(source: IO[bytes], log: IO[bytes]) -> None:
    """Copy ``source`` to ``log`` and to the launcher's stdout until end of file, then close both."""
    with source, log:
        for chunk in iter(lambda: os.read(source.fileno(), 65536), b""):
            log.write(chunk)
            log.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


@dataclass
class _Rank:
    """One started rank: its process and what the launcher did to it."""

    rank: int
    process: subprocess.Popen[bytes]
    tee: Optional[threading.Thread] = None
    # How the launcher stopped it, as the summary says it: "SIGTERM after the backend exited".
    stopped: Optional[str] = None

    @property
    def role(self) -> str:
        return "backend" if self.rank == 0 else "frontend"


def _ranks(ranks: Sequence[_Rank]) -> str:
    """Return ``"rank 1"`` or ``"ranks 1, 2"``."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r.rank) for r in ranks)


def _seconds(duration: float) -> str:
    """Return ``"30s"`` or ``"0.3s"``."""
    return f"{duration:g}s"


class _Supervisor:
    """Starts this node's ranks, watches them, and walks the shutdown steps when asked to."""

    def __init__(self, config: LaunchConfig) -> None:
        self._config = config
        self._ranks: list[_Rank] = []
        self._running: list[_Rank] = []
        # Appended by the signal handler, consumed by the loop: the handler itself does no work.
        self._received: list[signal.Signals] = []
        self._handled = 0
        self._next_steps: list[signal.Signals] = []
        self._next_step_at: Optional[float] = None
        self._last_step: Optional[signal.Signals] = None
        # What the next step waits for, as in "still running 30s (--grace) after <this>".
        self._waiting_after = ""
        # Why the ranks are being stopped, as in "SIGTERM <this>".
        self._stopping_because = ""
        self._grace_notice_at: Optional[float] = None
        self._backend_code = 0
        self._backend_status_counts = False
        self.interrupted_by: Optional[signal.Signals] = None

    def on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        """Record a SIGINT or SIGTERM sent to the launcher; the loop acts on it."""
        self._received.append(signal.Signals(signum))

    def start(self) -> None:
        """Start one process per local rank."""
        config = self._config
        if config.logdir is not None:
            config.logdir.mkdir(parents=True, exist_ok=True)
        if config.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
            _say("setting OMP_NUM_THREADS=1 for each rank (as torchrun does) so that the ranks do not "
                 "overload the machine; set it yourself to tune it")
        # The kernel sends the parent-death signal when the thread that forked the child ends, so
        # every rank is started from this thread, which lives as long as the launcher.
        die_with_launcher = _parent_death_hook(os.getpid())
        try:
            for local_rank in range(config.nproc_per_node):
                rank = config.node_rank * config.nproc_per_node + local_rank
                started = self._start_rank(rank, local_rank, die_with_launcher)
                self._ranks.append(started)
                self._running.append(started)
        finally:
            # Forking runs Python code in the child (the hook), which can deadlock on a lock that
            # another thread held at the fork; so the output threads start once every rank is forked.
            for started in self._ranks:
                if started.tee is not None:
                    started.tee.start()

    def _start_rank(
        self, rank: int, local_rank: int, die_with_launcher: Optional[Callable[[], None]]
    ) -> _Rank:
        """Start ``rank``; with ``--server_output`` rank 0 comes back with its output thread not started."""
        config = self._config
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(local_rank),
            WORLD_SIZE=str(config.world_size),
            LOCAL_WORLD_SIZE=str(config.nproc_per_node),
            MASTER_ADDR=config.master_addr,
            MASTER_PORT=str(config.master_port),
        )
        env[TOKEN_VAR] = config.token
        if config.nproc_per_node > 1:
            env.setdefault("OMP_NUM_THREADS", "1")
        if config.init_method is None:
            env.pop(INIT_METHOD_VAR, None)
        else:
            env[INIT_METHOD_VAR] = config.init_method
        if config.no_python:
            command = [config.script, *config.script_args]
        elif config.run_module:
            command = [sys.executable, "-u", "-m", config.script, *config.script_args]
        else:
            command = [sys.executable, "-u", config.script, *config.script_args]

        if config.logdir is None:
            return _Rank(rank, subprocess.Popen(
                command, env=env, start_new_session=True, preexec_fn=die_with_launcher
            ))
        log = (config.logdir / f"rank_{rank}.log").open("wb")
        tee_to_console = rank == 0 and config.server_output
        try:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE if tee_to_console else log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_launcher,
            )
        except BaseException:
            log.close()
            raise
        if not tee_to_console:
            log.close()
            return _Rank(rank, process)
        assert process.stdout is not None  # stdout=PIPE above
        tee = threading.Thread(target=_tee, args=(process.stdout, log), name="rank-0-output", daemon=True)
        return _Rank(rank, process, tee=tee)

    def supervise(self) -> None:
        """Return once every local rank has exited, walking the shutdown steps on the way."""
        while self._running:
            self._handle_signals()
            for exited in [r for r in self._running if r.process.poll() is not None]:
                self._running.remove(exited)
                self._on_exit(exited)
            now = time.monotonic()
            if self._grace_notice_at is not None and now >= self._grace_notice_at and self._running:
                self._announce_grace()
            if self._next_step_at is not None and now >= self._next_step_at:
                grace = self._config.grace.total_seconds()
                self._take_next_step(f"still running {_seconds(grace)} (--grace) after {self._waiting_after}")
            if self._running:
                time.sleep(_POLL_INTERVAL_S)

    def _handle_signals(self) -> None:
        while self._handled < len(self._received):
            received = self._received[self._handled]
            self._handled += 1
            if self.interrupted_by is None:
                self.interrupted_by = received
                self._grace_notice_at = None
                self._stopping_because = f"after the launcher received {received.name}"
                # A shutdown that the backend's exit began goes on from the step it reached.
                first = 0 if self._last_step is None else _SHUTDOWN_STEPS.index(self._last_step) + 1
                self._next_steps = list(_SHUTDOWN_STEPS[first:])
                if not self._next_steps:
                    _say(f"received {received.name}; {_ranks(self._running)} got SIGKILL already; "
                         "waiting for the kernel to end them")
                    continue
                plan = ", then ".join(step.name for step in self._next_steps)
                if len(self._next_steps) > 1:
                    plan += (f", {_seconds(self._config.grace.total_seconds())} (--grace) apart while any "
                             "still runs; send SIGINT or SIGTERM again to take the next step at once")
                _say(f"received {received.name}; stopping the ranks with {plan}")
                self._take_next_step(None)
            elif self._next_steps:
                self._take_next_step(f"the launcher received {received.name} while stopping them")

    def _on_exit(self, exited: _Rank) -> None:
        code = exited.process.returncode
        if code != 0:
            if exited.stopped is None:
                self._report_failure(exited)
            else:
                _say(f"rank {exited.rank} exited with code {_describe(code)}")
        if exited.rank != 0:
            return
        self._backend_status_counts = self.interrupted_by is None
        if self._running and self.interrupted_by is None:
            grace = self._config.grace.total_seconds()
            self._next_steps = [signal.SIGTERM, signal.SIGKILL]
            self._next_step_at = time.monotonic() + grace
            self._waiting_after = "the backend (rank 0) exited"
            self._stopping_because = "after the backend exited"
            self._backend_code = code
            if grace > _GRACE_NOTICE_S:
                self._grace_notice_at = time.monotonic() + _GRACE_NOTICE_S

    def _report_failure(self, failed: _Rank) -> None:
        """Say that ``failed`` exited on its own with a non-zero code, and show the end of its log."""
        message = f"rank {failed.rank} exited with code {_describe(failed.process.returncode)}"
        if self._config.logdir is None or failed.tee is not None:
            _say(message)  # its output is on the console already
            return
        path = self._config.logdir / f"rank_{failed.rank}.log"
        try:
            tail = _log_tail(path)
        except OSError as error:
            _say(f"{message}; its log {path} could not be read: {error}")
            return
        if not tail:
            _say(f"{message}; its log {path} is empty")
            return
        lines = "the last line" if len(tail) == 1 else f"the last {len(tail)} lines"
        _say(f"{message}; {lines} of its log {path}:")
        sys.stderr.write("".join(f"[rank {failed.rank}] {line}\n" for line in tail))
        sys.stderr.flush()

    def _announce_grace(self) -> None:
        self._grace_notice_at = None
        grace = self._config.grace.total_seconds()
        one = len(self._running) == 1
        _say(f"{_ranks(self._running)} {'is' if one else 'are'} still running {_seconds(_GRACE_NOTICE_S)} "
             f"after the backend (rank 0) exited with code {_describe(self._backend_code)}; sending "
             f"{'it' if one else 'them'} SIGTERM in {_seconds(grace - _GRACE_NOTICE_S)} (--grace "
             f"{grace:g}) unless {'it exits' if one else 'they exit'} first")

    def _take_next_step(self, why: Optional[str]) -> None:
        """Send the next shutdown signal to every rank still running; ``why`` it is sent now."""
        step = self._next_steps.pop(0)
        # A rank that exited since the last poll is reaped here, so that it is not counted as stopped.
        targets = [r for r in self._running if r.process.poll() is None]
        if targets:
            _say(f"sending {step.name} to {_ranks(targets)}" + (f": {why}" if why else ""))
        for target in targets:
            target.stopped = f"{step.name} {self._stopping_because}"
            try:
                os.killpg(target.process.pid, step)
            except ProcessLookupError:
                pass  # exited since the poll above; the loop will reap it
        self._last_step = step
        self._waiting_after = step.name
        self._next_step_at = None
        if self._next_steps:
            self._next_step_at = time.monotonic() + self._config.grace.total_seconds()

    def kill_remaining(self) -> None:
        """SIGKILL and reap every rank still running, and let rank 0's output drain."""
        for running in self._running:
            try:
                os.killpg(running.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            running.process.wait()
        self._running.clear()
        for started in self._ranks:
            if started.tee is not None:
                started.tee.join(timeout=self._config.grace.total_seconds())

    def summarize(self) -> None:
        """Print each rank's exit status, the failed ranks and the ranks it stopped to stderr."""
        _say("summary:")
        for started in self._ranks:
            note = ", stopped by the launcher" if started.stopped is not None else ""
            _say(f"  rank {started.rank} ({started.role}) exited with code "
                 f"{_describe(started.process.returncode)}{note}")
        failed = [r for r in self._ranks if r.stopped is None and r.process.returncode != 0]
        if failed:
            _say(f"failed ranks: {', '.join(str(r.rank) for r in failed)}")
        stopped: dict[str, list[_Rank]] = {}
        for started in self._ranks:
            if started.stopped is not None:
                stopped.setdefault(started.stopped, []).append(started)
        for how, ranks in stopped.items():
            _say(f"stopped by the launcher: {_ranks(ranks)} ({how})")
        if not failed and not stopped:
            _say("no rank failed")

    def exit_code(self) -> int:
        """Return the launcher's exit code, as the module docstring's "Exit codes" describes."""
        if self.interrupted_by is not None and not self._backend_status_counts:
            return 128 + self.interrupted_by
        backend = next((r for r in self._ranks if r.rank == 0), None)
        if backend is not None:
            code = backend.process.returncode
            return 128 - code if code < 0 else code
        return 0 if all(r.process.returncode == 0 for r in self._ranks) else 1


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
    supervisor = _Supervisor(config)
    first, last = config.node_rank * config.nproc_per_node, (config.node_rank + 1) * config.nproc_per_node - 1
    ranks = f"rank {first}" if first == last else f"ranks {first}..{last}"
    meeting = (f"init_method {config.init_method}" if config.init_method is not None
               else f"master {config.master_addr}:{config.master_port}")
    _say(f"starting {ranks} of world_size {config.world_size} ({meeting})")
    if config.logdir is not None:
        console = "; rank 0 also to this console" if config.server_output and first == 0 else ""
        _say(f"each rank writes to {config.logdir / 'rank_{RANK}.log'}{console}")
    elif config.nproc_per_node > 1:
        _say("all ranks share this console; pass --logdir DIR to keep each rank's output in its own file")
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


if __name__ == "__main__":
    sys.exit(main())
