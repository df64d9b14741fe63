"""Command-line arguments every openfl_api script understands, with environment fallbacks.

``openfl_api.parser.parse_args()`` reads ``--rank``, ``--world_size``, ``--init_method``, ... and
falls back to the variables the launcher sets (``RANK``, ``WORLD_SIZE``, ``OPENFL_INIT_METHOD``,
``MASTER_ADDR``/``MASTER_PORT``). The admission token is not an option, so it never shows in a
process list: pass ``API(token=...)`` or set ``OPENFL_API_TOKEN`` (the launcher sets one per run). Scripts with arguments of their own extend
the parser::

    parser = ofl.parser.build_parser()
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

A script given no rank at all (no ``--rank``, no ``RANK`` in the environment: started by hand, not
by a launcher) takes rank 0, the backend, and logs a warning that says so and gives the commands
that start the frontends, or every rank at once through the launcher.

Inside ``python -m openfl_api.simulate`` every rank is a thread of one process; each thread sees
its own ``RANK``, ``WORLD_SIZE``, ... through :func:`environ`, an overlay on ``os.environ`` that
holds for the calling thread only (see :func:`environment`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import contextvars
import os
import sys
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

__all__ = ["build_parser", "parse_args", "default_init_method", "environ", "environment", "warn_rank_zero"]

DEFAULT_PORT = 29500

_overlay: "contextvars.ContextVar[Mapping[str, str]]" = contextvars.ContextVar("openfl_api_environ", default={})


def environ() -> Mapping[str, str]:
    """The environment as this thread sees it: the overlay set by :func:`environment`, then ``os.environ``."""
    overlay = _overlay.get()
    return collections.ChainMap(dict(overlay), os.environ) if overlay else os.environ


_current = environ  # the parameters named ``environ`` below shadow the function


@contextlib.contextmanager
def environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Within the block, :func:`environ` (so ``parse_args``, ``Address`` and ``API``) sees
    ``variables`` over ``os.environ`` in this thread only; ``os.environ`` itself is untouched.

    Threads do not inherit the overlay: a simulated rank sets it on the thread that runs it.
    """
    merged: Dict[str, str] = {**_overlay.get(), **{str(k): str(v) for k, v in variables.items()}}
    token = _overlay.set(merged)
    try:
        yield
    finally:
        _overlay.reset(token)


def default_init_method(environ: Optional[Mapping[str, str]] = None) -> str:
    """Return the init method the environment implies: OPENFL_INIT_METHOD, then MASTER_ADDR/PORT."""
    environ = _current() if environ is None else environ
    if environ.get("OPENFL_INIT_METHOD"):
        return environ["OPENFL_INIT_METHOD"]
    host = environ.get("MASTER_ADDR", "localhost")
    port = environ.get("MASTER_PORT", str(DEFAULT_PORT))
    return f"tcp://{host}:{port}"


def _int_env(environ: Mapping[str, str], name: str, default: Optional[int]) -> Optional[int]:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        from openfl_api.errors import ConfigurationError

        raise ConfigurationError(f"environment variable {name} must be an integer, got {value!r}") from None


def warn_rank_zero(init_method: str, world_size: int) -> None:
    """Log that this process took rank 0 (the backend) because it was given no rank, and how to
    start the other ranks."""
    from openfl_api.logger import bind

    script = sys.argv[0] if sys.argv and sys.argv[0] else "script.py"
    last = max(world_size - 1, 1)
    others = "--rank 1" if last == 1 else f"--rank 1 ... --rank {last}"
    bind("backend", 0).warning(
        f"no rank given (neither --rank nor RANK): this process is the backend, rank 0, of {init_method} with "
        f"world_size {world_size}. Start each frontend with python {script} {others} --world_size {world_size}, "
        f"or start every rank at once with python -m openfl_api.launch --nproc_per_node {world_size} {script}"
    )


class _Parser(argparse.ArgumentParser):
    """Fills in rank 0 when no rank was given, saying so (:func:`warn_rank_zero`)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, rest = super().parse_known_args(args, namespace)
        if getattr(parsed, "rank", 0) is None:
            parsed.rank = 0
            warn_rank_zero(parsed.init_method, parsed.world_size)
        return parsed, rest


def build_parser(environ: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    """Return an ArgumentParser with openfl_api's options; defaults come from ``environ``."""
    env = _current() if environ is None else environ
    parser = _Parser(description="openfl_api federated training")
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend of the pipes (gloo)")
    parser.add_argument("--init_method", "--init-method", default=default_init_method(env),
                        help="tcp://host:port, file:///path or memory://name (env OPENFL_INIT_METHOD)")
    parser.add_argument("--world_size", "--world-size", type=int, default=_int_env(env, "WORLD_SIZE", 2),
                        help="backend plus frontends of this address (env WORLD_SIZE)")
    parser.add_argument("--rank", type=int, default=_int_env(env, "RANK", None),
                        help="0 is the backend, > 0 a frontend (env RANK; none at all: 0, with a warning)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=_int_env(env, "LOCAL_RANK", 0),
                        help="rank on this node (env LOCAL_RANK)")
    parser.add_argument("--group_name", "--group-name", default=env.get("OPENFL_GROUP_NAME", "openfl_api"),
                        help="name of the federation on this address (env OPENFL_GROUP_NAME)")
    parser.add_argument("--address_file", "--address-file", default=None,
                        help="JSON address file to serve (backend) or join (frontend)")
    parser.add_argument("--resume", default=env.get("OPENFL_RESUME") or None,
                        help="backend: checkpoint prefix to resume from, API(resume=...) (env OPENFL_RESUME)")
    return parser


def parse_args(args: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse openfl_api's options from ``args`` (default: ``sys.argv[1:]``)."""
    return build_parser().parse_args(args)
