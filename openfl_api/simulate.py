"""Run every rank of a federation as a thread of one process: ``python -m openfl_api.simulate``.

The same script that ``python -m openfl_api.launch`` starts as separate processes runs here as
``--nproc_per_node`` threads over a ``memory://`` address: no sockets, no store server, the same
API, steps and aggregators. Each thread sees its own ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE`` and ``OPENFL_INIT_METHOD`` through :func:`openfl_api.parser.environ`, so the
script's ``ofl.parser.parse_args()`` and ``ofl.Address(args=args)`` work unchanged.

Usage
-----

::

    python -m openfl_api.simulate [--nproc_per_node N] [--timeout SECONDS] script.py [script args ...]
    python -m openfl_api.simulate [--nproc_per_node N] -m package.module [module args ...]
    python -m openfl_api.simulate --record run.jsonl [--tensorboard DIR] script.py [script args ...]

Rank 0 is the backend, ranks 1..N-1 the frontends; with virtual clients
(:class:`~openfl_api.virtual_clients.VirtualClients`) ``--nproc_per_node 2`` already simulates any
number of clients. ``OPENFL_API_TOKEN`` is kept when set, else one random token per run is given
to every rank (as the launcher does); ``os.environ`` is never changed. ``--record`` and
``--tensorboard`` make the backend record the run, as the launcher's options of the same names do
(:mod:`openfl_api.record`).

From Python, for tests and notebooks::

    from openfl_api.simulate import simulate
    results = simulate(main, nproc_per_node=3)          # main() on 3 ranks; their return values
    simulate("script.py", nproc_per_node=3, args=["--rounds", "5"])

What differs from separate processes
------------------------------------

- Threads share torch's global random generator and ``sys.argv``: draw what must be reproducible
  from a ``torch.Generator`` (``VirtualClients`` gives one per client), and build the backend's
  initial model from a seeded generator rather than after ``torch.manual_seed``.
- Threads share the GIL and torch's intra-op thread pool; a process per rank
  (``openfl_api.launch``) runs frontends in parallel.
- The command runs torch with one thread (``OMP_NUM_THREADS`` chooses another count), as the
  launcher runs each rank: a matmul splits its sums by thread, so the same seed gives the same
  weights under both commands only with the same count. ``simulate()`` from Python leaves
  torch's thread count to its caller.
- A rank that raises is reported and the others go on, as with the launcher; once the backend
  (rank 0) has returned, the others get ``--grace`` seconds (default 30) to return.

Exit codes
----------

0 when every rank returned; 1 when a rank raised or did not return within ``--timeout`` or
``--grace`` (each such rank is named on stderr); 2 for a usage error; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import builtins
import os
import runpy
import secrets
import sys
import threading
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from openfl_api.errors import ConfigurationError
from openfl_api.launch.config import RECORD_VAR, TENSORBOARD_VAR
from openfl_api.parser import environ, environment

__all__ = ["simulate", "SimulationError", "main"]

_PREFIX = "[openfl_api.simulate]"


class SimulationError(RuntimeError):
    """A simulated rank raised or did not return in time; ``failures`` maps rank to the reason."""

    def __init__(self, failures: Dict[int, str]) -> None:
        self.failures = dict(failures)
        listed = "; ".join(f"rank {rank}: {reason}" for rank, reason in sorted(failures.items()))
        super().__init__(f"{len(failures)} simulated rank(s) failed: {listed}")


class _Rank(threading.Thread):
    def __init__(self, rank: int, variables: Dict[str, str], body: Callable[[], Any]) -> None:
        super().__init__(name=f"openfl-simulate-rank{rank}", daemon=True)
        self.rank, self.variables, self.body = rank, variables, body
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        with environment(self.variables):
            try:
                self.result = self.body()
            except SystemExit as exc:  # a script's sys.exit(): only a non-zero code is a failure
                if exc.code not in (None, 0):
                    self.error = exc
            except BaseException as exc:  # reported by simulate()
                self.error = exc


def simulate(
    target: Union[str, Path, Callable[[], Any]],
    nproc_per_node: int,
    args: Sequence[str] = (),
    *,
    module: bool = False,
    timeout: Optional[timedelta] = None,
    grace: timedelta = timedelta(seconds=30),
    record: Union[str, Path, None] = None,
    tensorboard: Union[str, Path, None] = None,
) -> List[Any]:
    """Run ``target`` on ``nproc_per_node`` ranks, one thread each, over a fresh ``memory://`` address.

    Args:
        target: a callable run with no arguments on every rank, or the path of a script (run as
            ``__main__``, like ``python script.py``), or with ``module=True`` a module name.
        nproc_per_node: ranks, >= 2 (rank 0 is the backend).
        args: the script's arguments (``sys.argv[1:]`` while it runs); only for a script or module.
        timeout: how long to wait for all ranks; None waits as long as the backend runs.
        grace: how long the other ranks may take once the backend has returned.
        record: the JSON Lines record the backend writes (an ``API`` built without ``record=``).
        tensorboard: a folder for the backend's TensorBoard event files.

    Returns:
        The return value of ``target`` on each rank, indexed by rank (None for scripts).

    Raises:
        ConfigurationError: bad arguments.
        SimulationError: a rank raised (the first such exception is chained) or did not return.
    """
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 2:
        raise ConfigurationError(
            f"simulate(nproc_per_node=...) must be an int >= 2 (a backend and at least one frontend), "
            f"got {nproc_per_node!r}"
        )
    for label, value in (("timeout", timeout), ("grace", grace)):
        if value is not None and (not isinstance(value, timedelta) or value < timedelta(0)):
            raise ConfigurationError(f"simulate({label}=...) must be a datetime.timedelta >= 0, got {value!r}")
    recording = {}
    for label, variable, value in (("record", RECORD_VAR, record), ("tensorboard", TENSORBOARD_VAR, tensorboard)):
        if value is not None:
            if not isinstance(value, (str, Path)) or not str(value):
                raise ConfigurationError(f"simulate({label}=...) must be a non-empty path or None, got {value!r}")
            recording[variable] = str(value)
    body, argv, path = _body(target, list(args), module)
    token = environ().get("OPENFL_API_TOKEN") or secrets.token_hex(16)
    init_method = f"memory://simulate-{uuid.uuid4().hex[:12]}"
    ranks = [
        _Rank(rank, {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc_per_node),
                     "LOCAL_WORLD_SIZE": str(nproc_per_node), "OPENFL_INIT_METHOD": init_method,
                     "OPENFL_API_TOKEN": token, **recording}, body)
        for rank in range(nproc_per_node)
    ]
    saved_argv, saved_path = sys.argv, list(sys.path)
    if argv is not None:
        sys.argv = argv
    if path is not None:
        sys.path.insert(0, path)
    try:
        for rank in ranks:
            rank.start()
        late = _wait(ranks, timeout, grace)
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    failures = {r.rank: f"{type(r.error).__name__}: {r.error}" for r in ranks if r.error is not None}
    failures.update({rank: reason for rank, reason in late.items()})
    if failures:
        error = SimulationError(failures)
        first = next((r.error for r in ranks if r.error is not None), None)
        raise error from first
    return [r.result for r in ranks]


def _body(target: Any, args: List[str], module: bool) -> tuple:
    """``(body, sys.argv for the run or None, folder to put first on sys.path or None)``."""
    if callable(target) and not isinstance(target, (str, Path)):
        if args or module:
            raise ConfigurationError("simulate(args=..., module=True) apply to a script or module, not a callable")
        return target, None, None
    if module:
        name = str(target)
        return (lambda: runpy.run_module(name, run_name="__main__", alter_sys=False) and None), [name, *args], ""
    script = Path(target)
    if not script.is_file():
        raise ConfigurationError(
            f"script {str(target)!r} does not exist (looked in {Path.cwd()}); give the path of a Python file"
        )
    code = compile(script.read_bytes(), str(script), "exec")

    def body() -> None:
        # Not runpy.run_path: it swaps sys.modules["__main__"], which threads would race on.
        exec(code, {"__name__": "__main__", "__file__": str(script), "__builtins__": builtins})

    return body, [str(script), *args], str(script.resolve().parent)


def _wait(ranks: List[_Rank], timeout: Optional[timedelta], grace: timedelta) -> Dict[int, str]:
    """Wait for the ranks; returns ``{rank: reason}`` for those that did not return in time."""
    deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
    backend = ranks[0]
    while backend.is_alive() and (deadline is None or time.monotonic() < deadline):
        backend.join(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))
    if not backend.is_alive():
        after = time.monotonic() + grace.total_seconds()
        deadline = after if deadline is None else min(deadline, after)
    for rank in ranks[1:]:
        rank.join(max(0.0, deadline - time.monotonic()))
    limit = f"--timeout {timeout}" if backend.is_alive() else f"--grace {grace} after the backend returned"
    return {r.rank: f"did not return within {limit}" for r in ranks if r.is_alive()}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openfl_api.simulate",
        description="Run every rank of an openfl_api script as a thread of this process (memory:// pipes).",
    )
    parser.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=2,
                        help="ranks to run, >= 2: the backend and the frontends (default 2)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for all ranks (default: none)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the frontends may take once the backend returned (default 30)")
    parser.add_argument("--record", default=None, metavar="FILE",
                        help="the backend writes the record of the run (JSON Lines) to FILE")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="the backend writes TensorBoard event files of the run to DIR")
    parser.add_argument("-m", "--module", action="store_true", help="run the script as a module, like python -m")
    parser.add_argument("script", help="the script (or module with -m) every rank runs")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script unchanged")
    return parser


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    return _build_parser().parse_args(argv)


def _one_thread_unless_set() -> None:
    """One torch thread, as the launcher gives each rank (``OMP_NUM_THREADS=1``), unless the
    environment says otherwise: the thread count changes how matmuls split their sums, so the same
    script gives the same bits under both commands only with the same count."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(1)
    print(f"{_PREFIX} using one torch thread, as the launcher's ranks do (set OMP_NUM_THREADS to choose)",
          file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code."""
    options = _parse(argv)
    _one_thread_unless_set()
    try:
        for label in ("timeout", "grace"):
            value = getattr(options, label)
            if value is not None and value < 0:
                raise ConfigurationError(f"--{label} must be >= 0 seconds, got {value}")
        simulate(options.script, options.nproc_per_node, options.script_args, module=options.module,
                 timeout=None if options.timeout is None else timedelta(seconds=options.timeout),
                 grace=timedelta(seconds=options.grace), record=options.record, tensorboard=options.tensorboard)
    except ConfigurationError as exc:
        print(f"{_PREFIX} error: {exc}", file=sys.stderr)
        return 2
    except SimulationError as exc:
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        for rank, reason in sorted(exc.failures.items()):
            print(f"{_PREFIX} rank {rank} failed: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_PREFIX} interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
