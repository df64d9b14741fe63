"""The launcher's supervisor: starts this node's ranks, watches them and walks the shutdown steps.

It also reports how each rank ended: failures with the end of the rank's log, and the summary. The
behaviour it implements is the manual in :mod:`openfl_api.launch`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Callable, Optional, Sequence

from openfl_api.launch.config import (
    INIT_METHOD_VAR, PROGRESS_FD_VAR, RECORD_VAR, TENSORBOARD_VAR, TOKEN_VAR, LaunchConfig,
)

__all__ = ["Supervisor", "say"]

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


def _describe(code: int) -> str:
    """Return ``"3"`` for an exit code and ``"-9 (SIGKILL)"`` for a signal, as Popen reports them."""
    if code >= 0:
        return str(code)
    try:
        return f"{code} ({signal.Signals(-code).name})"
    except ValueError:
        return str(code)


def say(message: str) -> None:
    """Print ``message`` to stderr behind the launcher's prefix."""
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


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


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


class Supervisor:
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
            say("setting OMP_NUM_THREADS=1 for each rank (as torchrun does) so that the ranks do not "
                 "overload the machine; set it yourself to tune it")
        # The kernel sends the parent-death signal when the thread that forked the child ends, so
        # every rank is started from this thread, which lives as long as the launcher.
        die_with_launcher = _parent_death_hook(os.getpid())
        try:
            for local_rank in range(config.nproc_per_node):
                rank = config.first_rank + local_rank
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
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        if config.init_method is None:
            env.pop(INIT_METHOD_VAR, None)
        else:
            env[INIT_METHOD_VAR] = config.init_method
        for variable, value in ((RECORD_VAR, config.record), (TENSORBOARD_VAR, config.tensorboard)):
            if value is not None:
                env[variable] = str(value)
        env.pop(PROGRESS_FD_VAR, None)
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
        # The backend's output goes to its log; its progress line goes to this terminal, if any.
        console = os.dup(sys.stderr.fileno()) if rank == 0 and _is_terminal(sys.stderr) else None
        if console is not None:
            env[PROGRESS_FD_VAR] = str(console)
        try:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE if tee_to_console else log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_launcher,
                pass_fds=() if console is None else (console,),
            )
        except BaseException:
            log.close()
            raise
        finally:
            if console is not None:
                os.close(console)
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
                    say(f"received {received.name}; {_ranks(self._running)} got SIGKILL already; "
                         "waiting for the kernel to end them")
                    continue
                plan = ", then ".join(step.name for step in self._next_steps)
                if len(self._next_steps) > 1:
                    plan += (f", {_seconds(self._config.grace.total_seconds())} (--grace) apart while any "
                             "still runs; send SIGINT or SIGTERM again to take the next step at once")
                say(f"received {received.name}; stopping the ranks with {plan}")
                self._take_next_step(None)
            elif self._next_steps:
                self._take_next_step(f"the launcher received {received.name} while stopping them")

    def _on_exit(self, exited: _Rank) -> None:
        code = exited.process.returncode
        if code != 0:
            if exited.stopped is None:
                self._report_failure(exited)
            else:
                say(f"rank {exited.rank} exited with code {_describe(code)}")
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
            say(message)  # its output is on the console already
            return
        path = self._config.logdir / f"rank_{failed.rank}.log"
        try:
            tail = _log_tail(path)
        except OSError as error:
            say(f"{message}; its log {path} could not be read: {error}")
            return
        if not tail:
            say(f"{message}; its log {path} is empty")
            return
        lines = "the last line" if len(tail) == 1 else f"the last {len(tail)} lines"
        say(f"{message}; {lines} of its log {path}:")
        sys.stderr.write("".join(f"[rank {failed.rank}] {line}\n" for line in tail))
        sys.stderr.flush()

    def _announce_grace(self) -> None:
        self._grace_notice_at = None
        grace = self._config.grace.total_seconds()
        one = len(self._running) == 1
        say(f"{_ranks(self._running)} {'is' if one else 'are'} still running {_seconds(_GRACE_NOTICE_S)} "
             f"after the backend (rank 0) exited with code {_describe(self._backend_code)}; sending "
             f"{'it' if one else 'them'} SIGTERM in {_seconds(grace - _GRACE_NOTICE_S)} (--grace "
             f"{grace:g}) unless {'it exits' if one else 'they exit'} first")

    def _take_next_step(self, why: Optional[str]) -> None:
        """Send the next shutdown signal to every rank still running; ``why`` it is sent now."""
        step = self._next_steps.pop(0)
        # A rank that exited since the last poll is reaped here, so that it is not counted as stopped.
        targets = [r for r in self._running if r.process.poll() is None]
        if targets:
            say(f"sending {step.name} to {_ranks(targets)}" + (f": {why}" if why else ""))
        for target in sorted(targets, key=lambda r: r.rank == 0):  # the backend last (see the module's docs)
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
        say("summary:")
        for started in self._ranks:
            note = ", stopped by the launcher" if started.stopped is not None else ""
            say(f"  rank {started.rank} ({started.role}) exited with code "
                 f"{_describe(started.process.returncode)}{note}")
        failed = [r for r in self._ranks if r.stopped is None and r.process.returncode != 0]
        if failed:
            say(f"failed ranks: {', '.join(str(r.rank) for r in failed)}")
        stopped: dict[str, list[_Rank]] = {}
        for started in self._ranks:
            if started.stopped is not None:
                stopped.setdefault(started.stopped, []).append(started)
        for how, ranks in stopped.items():
            say(f"stopped by the launcher: {_ranks(ranks)} ({how})")
        if not failed and not stopped:
            say("no rank failed")

    def exit_code(self) -> int:
        """Return the launcher's exit code, as "Exit codes" in the manual of :mod:`openfl_api.launch` says."""
        if self.interrupted_by is not None and not self._backend_status_counts:
            return 128 + self.interrupted_by
        backend = next((r for r in self._ranks if r.rank == 0), None)
        if backend is not None:
            code = backend.process.returncode
            return 128 - code if code < 0 else code
        return 0 if all(r.process.returncode == 0 for r in self._ranks) else 1
