"""The launcher's configuration: :class:`LaunchConfig`, and the command line that builds it.

What each option means, and the errors it can raise, is the manual in :mod:`openfl_api.launch`.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Mapping, Optional, Sequence
from urllib.parse import urlsplit

from openfl_api.errors import ConfigurationError

__all__ = ["LaunchConfig", "parse_args", "TOKEN_VAR", "INIT_METHOD_VAR", "RECORD_VAR", "TENSORBOARD_VAR",
           "PROGRESS_FD_VAR"]

TOKEN_VAR = "OPENFL_API_TOKEN"
INIT_METHOD_VAR = "OPENFL_INIT_METHOD"
#: The record and TensorBoard folder of the run (``--record``, ``--tensorboard``), read by the backend's API.
RECORD_VAR = "OPENFL_RECORD"
TENSORBOARD_VAR = "OPENFL_TENSORBOARD"
#: A file descriptor of the launcher's terminal on which the backend draws its progress line.
PROGRESS_FD_VAR = "OPENFL_PROGRESS_FD"


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
        node_procs: Ranks per node, one count per node, when the nodes run different numbers
            (``--nproc_per_node 1,4,4``); empty when every node runs ``nproc_per_node``.
        node_rank: Index of this node; node 0 runs the backend.
        master_addr: Address of the node running the backend.
        init_method: ``tcp://`` or ``file://`` URL handed to the ranks, or None.
        logdir: Folder for one log file per rank, or None for the console.
        server_output: With ``logdir``, also copy rank 0's output to the console.
        grace: Wait for the other ranks after the backend exited, and between shutdown steps.
        run_module: Run ``script`` as a module (``python -m``).
        no_python: Run ``script`` as a program of its own.
        record: The JSON Lines record the backend writes, or None (see :mod:`openfl_api.record`).
        tensorboard: A folder for the backend's TensorBoard event files, or None.

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
    record: Optional[Path] = None
    tensorboard: Optional[Path] = None
    node_procs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigurationError(f"nnodes must be >= 1, got {self.nnodes}; pass --nnodes 1 or more")
        if self.node_procs:
            if len(self.node_procs) != self.nnodes or min(self.node_procs) < 1:
                raise ConfigurationError(
                    f"--nproc_per_node as a list needs one count >= 1 per node ({self.nnodes} with --nnodes "
                    f"{self.nnodes}), got {','.join(map(str, self.node_procs))}; e.g. --nproc_per_node 1,4,4 "
                    "with --nnodes 3, the same list on every node"
                )
            if self.nproc_per_node != self.node_procs[self.node_rank]:
                raise ConfigurationError("nproc_per_node must be this node's entry of node_procs")
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
        if self.record is not None and not self.record.parent.is_dir():
            raise ConfigurationError(
                f"--record {self.record}: the folder {self.record.parent} does not exist; create it or record "
                "to a file in an existing folder"
            )
        self._check_script()

    @property
    def world_size(self) -> int:
        """Ranks in the whole federation: ``nnodes * nproc_per_node``, or the sum of ``node_procs``."""
        return sum(self.node_procs) if self.node_procs else self.nnodes * self.nproc_per_node

    @property
    def first_rank(self) -> int:
        """The global rank of this node's first rank."""
        return sum(self.node_procs[:self.node_rank]) if self.node_procs else self.node_rank * self.nproc_per_node

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


def _counts(text: str) -> tuple[int, ...]:
    """``"4"`` -> ``(4,)``; ``"1,4,4"`` -> ``(1, 4, 4)``, for ``--nproc_per_node``."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of ranks, or one per node such as 1,4,4; got {text!r}") from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openfl_api.launch",
        description="Start the ranks of a federation on this node and supervise them. "
        "Rank 0 is the backend, every other rank a frontend. "
        "See the module docstring of openfl_api.launch for the full manual.",
    )
    parser.add_argument("--nproc_per_node", "--nproc-per-node", type=_counts, default=(1,),
                        help="ranks to start on this node (default 1; at least 2 when nnodes is 1), or one "
                             "count per node, e.g. 1,4,4 (the same list on every node)")
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
    parser.add_argument("--record", type=Path, default=None, metavar="FILE",
                        help="the backend writes the record of the run (JSON Lines) to FILE")
    parser.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                        help="the backend writes TensorBoard event files of the run to DIR")
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
        nproc_per_node=args.nproc_per_node[args.node_rank] if len(args.nproc_per_node) > 1 and
        0 <= args.node_rank < len(args.nproc_per_node) else args.nproc_per_node[0],
        node_procs=tuple(args.nproc_per_node) if len(args.nproc_per_node) > 1 else (),
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        init_method=args.init_method,
        logdir=args.logdir,
        server_output=args.server_output,
        grace=timedelta(seconds=args.grace),
        run_module=args.run_module,
        no_python=args.no_python,
        record=args.record,
        tensorboard=args.tensorboard,
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
