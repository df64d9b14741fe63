"""``python -m openfl_api.launch`` as users run it: real processes running tiny throwaway scripts.

Every script gets the test's ``tmp_path`` as its first argument and reports through files there,
written atomically (write, then rename). Tests wait on those files with a deadline, never a bare
sleep, and every launcher and rank is reaped in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent
from typing import Callable, Iterator, Mapping, Optional

import pytest

from openfl_api import launch
from openfl_api.launch import supervisor

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60.0  # generous: the launcher imports the whole package, torch included
TOKEN = "0123456789abcdef0123456789abcdef"

PRELUDE = '''\
import json, os, pathlib, signal, sys, time
OUT = pathlib.Path(sys.argv[1])
RANK = int(os.environ["RANK"])

def publish(name, text):
    tmp = OUT / f".{name}.tmp"
    tmp.write_text(text)
    tmp.rename(OUT / name)

def publish_pid():
    publish(f"pid_{RANK}", str(os.getpid()))

def wait_until(predicate, seconds=15):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(9)
        time.sleep(0.02)

def reaped(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
'''

DUMP_ENV = """
names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "OPENFL_API_TOKEN", "OPENFL_INIT_METHOD", "OMP_NUM_THREADS"]
publish(f"env_{RANK}.json", json.dumps({name: os.environ.get(name) for name in names}))
"""

SLEEP = """
publish_pid()
time.sleep(60)
"""


def _script(tmp_path: Path, *parts: str) -> Path:
    path = tmp_path / "rank.py"
    path.write_text(PRELUDE + "".join(dedent(part) for part in parts))
    return path


def _env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENFL_API_TOKEN", "OPENFL_INIT_METHOD", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def _pids(tmp_path: Path) -> list[int]:
    return [int(path.read_text()) for path in tmp_path.glob("pid_*")]


def _alive(pid: int) -> bool:
    """True until ``pid`` has exited and been reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _reap(launcher: subprocess.Popen[str], tmp_path: Path) -> None:
    """Stop the launcher (which forwards to its ranks), then kill whatever is left."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=5)
    for pid in _pids(tmp_path):  # ranks lead process groups of their own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        launcher.communicate(timeout=5)


@contextlib.contextmanager
def _launcher(
    tmp_path: Path, *args: str, env: Optional[Mapping[str, str]] = None
) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "openfl_api.launch", *args],
        cwd=tmp_path,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        _reap(process, tmp_path)


def _run(tmp_path: Path, *args: str, env: Optional[Mapping[str, str]] = None) -> tuple[int, str, str]:
    """Run the launcher to its end; return its exit code, stdout and stderr."""
    with _launcher(tmp_path, *args, env=env) as process:
        out, err = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, out, err


L = "[openfl_api.launch]"  # the prefix of the launcher's own lines on stderr
OMP_NOTE = (f"{L} setting OMP_NUM_THREADS=1 for each rank (as torchrun does) so that the ranks do not overload "
            "the machine; set it yourself to tune it")


def _lines(err: str) -> list[str]:
    """Every line of ``err``, with the free port the launcher chose written as PORT."""
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", err).splitlines()


def _said(err: str) -> list[str]:
    """The launcher's own lines of ``err``, without the ranks' output."""
    return [line for line in _lines(err) if line.startswith(L)]


def _signal_after_ranks_started(
    tmp_path: Path, process: subprocess.Popen[str], nproc: int, sig: signal.Signals
) -> None:
    _wait_for(lambda: len(_pids(tmp_path)) == nproc, f"{nproc} ranks to write their pid")
    process.send_signal(sig)


@dataclass(frozen=True)
class Launched:
    """A finished launcher run: its exit code and output, and the folder its ranks reported to."""

    code: int
    out: str
    err: str
    folder: Path

    def env(self, rank: int) -> dict[str, Optional[str]]:
        return json.loads((self.folder / f"env_{rank}.json").read_text())


def _launched(folder: Path, body: str, *args: str, env: Optional[Mapping[str, str]] = None) -> Launched:
    script = _script(folder, body)
    code, out, err = _run(folder, *args, str(script), str(folder), env=env)
    return Launched(code, out, err, folder)


# A launch costs seconds (the launcher's `import openfl_api` loads torch), so tests that only read
# what one run left behind share that run.
@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> Launched:
    """Three ranks dumping their environment; the shell holds a stale OPENFL_INIT_METHOD."""
    return _launched(tmp_path_factory.mktemp("three_ranks"), DUMP_ENV, "--nproc_per_node", "3",
                     env={"OPENFL_INIT_METHOD": "tcp://stale:1"})


@pytest.fixture(scope="module")
def second_node(tmp_path_factory: pytest.TempPathFactory) -> Launched:
    """Node 1 of two, two ranks each, with the token exported as multi-node runs require."""
    return _launched(tmp_path_factory.mktemp("second_node"), DUMP_ENV, "--nnodes", "2", "--node_rank", "1",
                     "--nproc_per_node", "2", "--master_port", "29555",
                     env={"OPENFL_API_TOKEN": TOKEN, "OMP_NUM_THREADS": "3"})


PRINT_RANK = """
print(f"out {RANK}")
print(f"err {RANK}", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Launched:
    """Two ranks printing to stdout and stderr with --logdir and --server_output over stale logs."""
    folder = tmp_path_factory.mktemp("logged")
    (folder / "logs").mkdir()
    for rank in range(2):
        (folder / "logs" / f"rank_{rank}.log").write_text("stale output of an earlier run\n")
    return _launched(folder, PRINT_RANK, "--nproc_per_node", "2", "--logdir", "logs", "--server_output")


def test_each_rank_gets_its_rank_and_the_federation_in_its_environment(three_ranks: Launched) -> None:
    assert three_ranks.code == 0, three_ranks.err
    envs = [three_ranks.env(rank) for rank in range(3)]
    port = envs[0]["MASTER_PORT"]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"],
             e["MASTER_PORT"]) for e in envs] == [
        (str(rank), str(rank), "3", "3", "127.0.0.1", port) for rank in range(3)
    ]


def test_free_port_is_chosen_when_none_is_given(three_ranks: Launched) -> None:
    port = three_ranks.env(0)["MASTER_PORT"] or ""

    assert port.isdigit() and 1 <= int(port) <= 65535, port


def test_ranks_share_one_generated_token(three_ranks: Launched) -> None:
    tokens = {three_ranks.env(rank)["OPENFL_API_TOKEN"] for rank in range(3)}

    assert len(tokens) == 1 and re.fullmatch(r"[0-9a-f]{32}", tokens.pop() or ""), tokens


def test_stale_init_method_from_the_shell_is_not_passed_on(three_ranks: Launched) -> None:
    assert [three_ranks.env(rank)["OPENFL_INIT_METHOD"] for rank in range(3)] == [None] * 3


def test_second_node_numbers_its_ranks_after_the_first(second_node: Launched) -> None:
    assert second_node.code == 0, second_node.err
    envs = [second_node.env(rank) for rank in (2, 3)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [
        ("2", "0", "4", "2"), ("3", "1", "4", "2")
    ]


def test_token_set_in_the_environment_is_kept(second_node: Launched) -> None:
    assert [second_node.env(rank)["OPENFL_API_TOKEN"] for rank in (2, 3)] == [TOKEN, TOKEN]


def test_each_rank_runs_one_openmp_thread_unless_told_otherwise(three_ranks: Launched) -> None:
    assert [three_ranks.env(rank)["OMP_NUM_THREADS"] for rank in range(3)] == ["1"] * 3
    assert "setting OMP_NUM_THREADS=1" in three_ranks.err


def test_openmp_threads_set_in_the_environment_are_kept(second_node: Launched) -> None:
    assert [second_node.env(rank)["OMP_NUM_THREADS"] for rank in (2, 3)] == ["3", "3"]


def test_init_method_reaches_every_rank(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'federation'}"

    launched = _launched(tmp_path, DUMP_ENV, "--nproc_per_node", "2", "--init_method", url)

    assert [launched.env(rank)["OPENFL_INIT_METHOD"] for rank in range(2)] == [url, url], launched.err
    assert _said(launched.err)[0] == f"{L} starting ranks 0..1 of world_size 2 (init_method {url})"


def test_options_accept_hyphens_as_well_as_underscores(tmp_path: Path) -> None:
    # The other tests spell every option with underscores.
    url = f"file://{tmp_path / 'federation'}"

    launched = _launched(
        tmp_path, DUMP_ENV, "--nproc-per-node", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
        "--master-port", "29556", "--init-method", url, "--logdir", "logs", "--server-output",
    )

    assert [(e["WORLD_SIZE"], e["MASTER_PORT"], e["OPENFL_INIT_METHOD"])
            for e in (launched.env(0), launched.env(1))] == [("2", "29556", url)] * 2, launched.err
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["rank_0.log", "rank_1.log"]


def test_logdir_holds_each_ranks_output_in_its_own_fresh_file(logged: Launched) -> None:
    logs = [set((logged.folder / "logs" / f"rank_{rank}.log").read_text().splitlines()) for rank in range(2)]

    assert logs == [{"out 0", "err 0"}, {"out 1", "err 1"}], logged.err


def test_server_output_echoes_rank_0_and_only_rank_0_to_the_console(logged: Launched) -> None:
    assert set(logged.out.splitlines()) == {"out 0", "err 0"}, logged.err
    assert _said(logged.err)[1] == f"{L} each rank writes to logs/rank_{{RANK}}.log; rank 0 also to this console"


def test_crashed_frontend_does_not_stop_the_others(tmp_path: Path) -> None:
    # Rank 1 exits 3; the others finish only once the launcher has reaped it, so a launcher that
    # stopped the federation on that crash would have stopped them before they could finish.
    script = _script(tmp_path, """
        if RANK == 1:
            publish_pid()
            sys.exit(3)
        wait_until(lambda: (OUT / "pid_1").exists())
        wait_until(lambda: reaped(int((OUT / "pid_1").read_text())))
        publish(f"done_{RANK}", "")
    """)

    code, _, err = _run(tmp_path, "--nproc_per_node", "3", str(script), str(tmp_path))

    assert (code, sorted(p.name for p in tmp_path.glob("done_*"))) == (0, ["done_0", "done_2"]), err
    assert re.search(r"rank 1 exited with code 3\n", err), err
    assert re.search(r"failed ranks: 1\n", err), err


def test_failed_rank_shows_the_end_of_its_log(tmp_path: Path) -> None:
    # Ranks 1..3 fail in three ways; rank 0 (on the console through --server_output) fails last.
    script = _script(tmp_path, """
        publish_pid()
        if RANK == 1:
            for line in range(30):
                print(f"line {line}")
            print("boom", file=sys.stderr)
            sys.exit(3)
        if RANK == 2:
            print("about to die")
            os.kill(os.getpid(), signal.SIGKILL)
        if RANK == 3:
            sys.stdout.write("y" * 100_000)
            sys.exit(4)
        for rank in (1, 2, 3):
            wait_until(lambda: (OUT / f"pid_{rank}").exists())
            wait_until(lambda: reaped(int((OUT / f"pid_{rank}").read_text())))
        sys.exit(5)
    """)

    code, out, err = _run(tmp_path, "--nproc_per_node", "4", "--logdir", "logs", "--server_output",
                          str(script), str(tmp_path))

    lines = _lines(err)

    def block(header: str, length: int) -> list[str]:
        assert header in lines, err
        start = lines.index(header)
        return lines[start:start + 1 + length]

    assert (code, out) == (5, ""), err
    assert block(f"{L} rank 1 exited with code 3; the last 20 lines of its log logs/rank_1.log:", 20) == [
        f"{L} rank 1 exited with code 3; the last 20 lines of its log logs/rank_1.log:",
        *(f"[rank 1] line {line}" for line in range(11, 30)),
        "[rank 1] boom",
    ]
    assert block(f"{L} rank 2 exited with code -9 (SIGKILL); the last line of its log logs/rank_2.log:", 1) == [
        f"{L} rank 2 exited with code -9 (SIGKILL); the last line of its log logs/rank_2.log:",
        "[rank 2] about to die",
    ]
    # Bounded in bytes: of one 100 000-byte line, only the last 8 KiB, marked as cut.
    assert block(f"{L} rank 3 exited with code 4; the last line of its log logs/rank_3.log:", 1) == [
        f"{L} rank 3 exited with code 4; the last line of its log logs/rank_3.log:",
        "[rank 3] ..." + "y" * 8192,
    ]
    # Rank 0's output is on the console already.
    assert f"{L} rank 0 exited with code 5" in lines, err


@pytest.mark.parametrize(
    ("exit_statement", "expected"),
    [("sys.exit(5)", 5), ("os.kill(os.getpid(), signal.SIGKILL)", 128 + signal.SIGKILL)],
    ids=["code", "signal"],
)
def test_backend_status_becomes_the_launchers_exit_code(
    tmp_path: Path, exit_statement: str, expected: int
) -> None:
    script = _script(tmp_path, f"""
        if RANK == 0:
            {exit_statement}
    """)

    code, _, err = _run(tmp_path, "--nproc_per_node", "2", str(script), str(tmp_path))

    assert code == expected, err


def test_sigterm_to_the_launcher_stops_and_reaps_every_rank(tmp_path: Path) -> None:
    script = _script(tmp_path, SLEEP)

    with _launcher(tmp_path, "--nproc_per_node", "3", "--grace", "10", str(script), str(tmp_path)) as process:
        _signal_after_ranks_started(tmp_path, process, 3, signal.SIGTERM)
        _, err = process.communicate(timeout=TIMEOUT_S)

        said = _said(err)
        assert (process.returncode, said[3:5], said[-1]) == (
            128 + signal.SIGTERM, [
                f"{L} received SIGTERM; stopping the ranks with SIGINT, then SIGTERM, then SIGKILL, 10s (--grace) "
                "apart while any still runs; send SIGINT or SIGTERM again to take the next step at once",
                f"{L} sending SIGINT to ranks 0, 1, 2",
            ],
            f"{L} stopped by the launcher: ranks 0, 1, 2 (SIGINT after the launcher received SIGTERM)",
        ), err
        _wait_for(lambda: not any(_alive(pid) for pid in _pids(tmp_path)), "every rank to be gone")


def _running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie, which whoever adopted it may never reap, counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_ranks_die_with_a_launcher_killed_by_sigkill(tmp_path: Path) -> None:
    # The ranks ignore SIGINT and SIGTERM, so only SIGKILL from the kernel can end them this soon.
    script = _script(tmp_path, """
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    """, SLEEP)

    with _launcher(tmp_path, "--nproc_per_node", "2", str(script), str(tmp_path)) as process:
        _wait_for(lambda: len(_pids(tmp_path)) == 2, "2 ranks to write their pid")
        process.kill()
        process.wait(timeout=TIMEOUT_S)

        _wait_for(lambda: not any(_running(pid) for pid in _pids(tmp_path)), "the ranks to die", timeout=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_rank_whose_launcher_died_before_the_parent_death_signal_was_set_does_not_run(tmp_path: Path) -> None:
    # The hook runs in the child between fork and exec; a launcher pid that is not the child's parent
    # is what the child sees when the launcher died before the hook ran.
    marker = tmp_path / "ran"
    hook = supervisor._parent_death_hook(launcher_pid=os.getpid() + 1_000_000)

    child = subprocess.Popen([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], preexec_fn=hook)
    try:
        code = child.wait(timeout=TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=5)

    assert (code, marker.exists()) == (-signal.SIGKILL, False)


def test_ranks_ignoring_sigint_and_sigterm_are_killed_after_grace(tmp_path: Path) -> None:
    script = _script(tmp_path, """
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    """, SLEEP)

    with _launcher(tmp_path, "--nproc_per_node", "2", "--grace", "0.3", str(script), str(tmp_path)) as process:
        _signal_after_ranks_started(tmp_path, process, 2, signal.SIGTERM)
        _, err = process.communicate(timeout=TIMEOUT_S)

    assert re.findall(r"rank \d exited with code -9 \(SIGKILL\)\n", err) == [
        "rank 0 exited with code -9 (SIGKILL)\n", "rank 1 exited with code -9 (SIGKILL)\n"
    ], err


def test_each_shutdown_signal_goes_to_the_frontends_before_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # A backend stopped first would end the requests its frontends wait on, and a frontend that
    # read that end before its own signal would finish as if the federation had ended.
    class Running:
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def poll(self) -> None:
            return None

    sent: list[int] = []
    monkeypatch.setattr(supervisor.os, "killpg", lambda pid, sig: sent.append(pid))
    monkeypatch.setattr(supervisor, "say", lambda text: None)
    watcher = object.__new__(supervisor.Supervisor)
    watcher._running = [supervisor._Rank(rank, Running(100 + rank)) for rank in (0, 1, 2)]
    watcher._next_steps = [signal.SIGINT]
    watcher._stopping_because = "after the launcher received SIGINT"
    watcher._take_next_step(None)
    assert sent == [101, 102, 100]


def test_second_ctrl_c_escalates_at_once(tmp_path: Path) -> None:
    # The ranks survive SIGINT and note it; with a 60 s grace only the second Ctrl-C can end them
    # within the test's timeout, by sending SIGTERM straight away.
    script = _script(tmp_path, """
        signal.signal(signal.SIGINT, lambda signum, frame: publish(f"sigint_{RANK}", ""))
    """, SLEEP)

    with _launcher(tmp_path, "--nproc_per_node", "2", "--grace", "60", str(script), str(tmp_path)) as process:
        _signal_after_ranks_started(tmp_path, process, 2, signal.SIGINT)
        _wait_for(lambda: len(list(tmp_path.glob("sigint_*"))) == 2, "both ranks to get SIGINT")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=TIMEOUT_S)

    assert (process.returncode, re.findall(r"rank \d exited with code (.*)\n", err), _said(err)[-1]) == (
        128 + signal.SIGINT, ["-15 (SIGTERM)", "-15 (SIGTERM)"],
        f"{L} stopped by the launcher: ranks 0, 1 (SIGTERM after the launcher received SIGINT)",
    ), err


def test_frontends_are_stopped_grace_after_the_backend_exited(tmp_path: Path) -> None:
    script = _script(tmp_path, """
        if RANK == 0:
            sys.exit(0)
    """, SLEEP)

    code, _, err = _run(tmp_path, "--nproc_per_node", "3", "--grace", "0.3", str(script), str(tmp_path))

    assert (code, re.findall(r"rank \d exited with code (.*)\n", err)) == (
        0, ["-15 (SIGTERM)", "-15 (SIGTERM)"]
    ), err


def test_ranks_stopped_after_the_backend_exited_are_reported_as_stopped_not_failed(tmp_path: Path) -> None:
    # Rank 1 fails on its own; the backend exits once the launcher has reaped it; ranks 2 and 3
    # run on until the launcher stops them.
    script = _script(tmp_path, """
        if RANK == 1:
            publish_pid()
            sys.exit(3)
        if RANK == 0:
            wait_until(lambda: (OUT / "pid_1").exists())
            wait_until(lambda: reaped(int((OUT / "pid_1").read_text())))
            sys.exit(0)
    """, SLEEP)

    code, _, err = _run(tmp_path, "--nproc_per_node", "4", "--grace", "0.3", str(script), str(tmp_path))

    assert (code, _said(err)[-7:]) == (0, [
        f"{L} summary:",
        f"{L}   rank 0 (backend) exited with code 0",
        f"{L}   rank 1 (frontend) exited with code 3",
        f"{L}   rank 2 (frontend) exited with code -15 (SIGTERM), stopped by the launcher",
        f"{L}   rank 3 (frontend) exited with code -15 (SIGTERM), stopped by the launcher",
        f"{L} failed ranks: 1",
        f"{L} stopped by the launcher: ranks 2, 3 (SIGTERM after the backend exited)",
    ]), err


def test_clean_run_prints_no_shutdown_messages(tmp_path: Path) -> None:
    # The backend exits once the frontends are up; they exit on their own right after it, well
    # within --grace.
    script = _script(tmp_path, """
        publish_pid()
        if RANK == 0:
            wait_until(lambda: (OUT / "pid_1").exists() and (OUT / "pid_2").exists())
        else:
            wait_until(lambda: (OUT / "pid_0").exists())
            wait_until(lambda: reaped(int((OUT / "pid_0").read_text())))
    """)

    code, _, err = _run(tmp_path, "--nproc_per_node", "3", "--grace", "15", str(script), str(tmp_path))

    assert (code, _lines(err)) == (0, [
        f"{L} starting ranks 0..2 of world_size 3 (master 127.0.0.1:PORT)",
        f"{L} all ranks share this console; pass --logdir DIR to keep each rank's output in its own file",
        OMP_NOTE,
        f"{L} summary:",
        f"{L}   rank 0 (backend) exited with code 0",
        f"{L}   rank 1 (frontend) exited with code 0",
        f"{L}   rank 2 (frontend) exited with code 0",
        f"{L} no rank failed",
    ]), err


def test_frontends_still_running_shortly_after_the_backend_exited_are_announced(tmp_path: Path) -> None:
    script = _script(tmp_path, """
        if RANK == 0:
            sys.exit(0)
    """, SLEEP)

    code, _, err = _run(tmp_path, "--nproc_per_node", "3", "--grace", "3", str(script), str(tmp_path))

    said = _said(err)
    assert (code, said[3:5], sorted(said[5:7]), said[-1]) == (0, [
        f"{L} ranks 1, 2 are still running 2s after the backend (rank 0) exited with code 0; sending them "
        "SIGTERM in 1s (--grace 3) unless they exit first",
        f"{L} sending SIGTERM to ranks 1, 2: still running 3s (--grace) after the backend (rank 0) exited",
    ], [
        f"{L} rank 1 exited with code -15 (SIGTERM)",
        f"{L} rank 2 exited with code -15 (SIGTERM)",
    ], f"{L} stopped by the launcher: ranks 1, 2 (SIGTERM after the backend exited)"), err


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--nproc_per_node", "0", "SCRIPT"], {},
         r"nproc_per_node must be >= 2 when nnodes is 1, got 0; a federation needs the backend and at least "
         r"one frontend: pass --nproc_per_node 2 or more"),
        (["--nproc_per_node", "1", "SCRIPT"], {},
         r"nproc_per_node must be >= 2 when nnodes is 1, got 1; a federation needs the backend and at least "
         r"one frontend: pass --nproc_per_node 2 or more"),
        (["--nnodes", "2", "--nproc_per_node", "0", "--master_port", "29500", "SCRIPT"],
         {"OPENFL_API_TOKEN": TOKEN}, r"nproc_per_node must be >= 1, got 0; pass --nproc_per_node 1 or more"),
        (["--nnodes", "2", "--node_rank", "2", "--master_port", "29500", "SCRIPT"],
         {"OPENFL_API_TOKEN": TOKEN}, r"node_rank must satisfy 0 <= node_rank < nnodes, got node_rank 2"),
        (["--nproc_per_node", "2", "missing.py"], {}, r"script 'missing\.py' does not exist"),
        (["--nnodes", "2", "SCRIPT"], {"OPENFL_API_TOKEN": TOKEN},
         r"--master_port is required when nnodes > 1"),
        (["--nnodes", "2", "--master_port", "29500", "SCRIPT"], {},
         r"OPENFL_API_TOKEN must be set when nnodes > 1"),
        (["--nproc_per_node", "2", "--master_port", "70000", "SCRIPT"], {},
         r"master_port must be in 1\.\.65535, got 70000"),
        (["--nproc_per_node", "2", "--init_method", "memory://x", "SCRIPT"], {},
         r"connects ranks inside one process only"),
        (["--nproc_per_node", "2", "--init_method", "udp://host:1", "SCRIPT"], {},
         r"init_method must start with tcp:// or file://"),
        (["--nproc_per_node", "2", "--server_output", "SCRIPT"], {},
         r"--server_output .* needs --logdir"),
        (["--nproc_per_node", "2", "--grace", "-1", "SCRIPT"], {},
         r"grace must be >= 0 seconds, got -1\.0; pass --grace 0 or more"),
        (["--nproc_per_node", "2", "--grace", "inf", "SCRIPT"], {},
         r"--grace must be a finite number of seconds, got inf; pass e\.g\. --grace 30"),
    ],
    ids=["nproc-0", "backend-alone", "nproc-0-of-several-nodes", "node-rank-out-of-range", "missing-script",
         "nnodes-without-port", "nnodes-without-token", "port-out-of-range", "memory-init-method",
         "unknown-scheme", "server-output-without-logdir", "negative-grace", "infinite-grace"],
)
def test_usage_errors_exit_2_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    args: list[str], env: dict[str, str], message: str,
) -> None:
    # In-process: parse_args is exactly what `python -m openfl_api.launch` runs before any rank
    # starts; the test below proves the command line reaches it.
    script = _script(tmp_path, SLEEP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENFL_API_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SystemExit) as exited:
        launch.parse_args([str(script) if a == "SCRIPT" else a for a in args])

    assert (exited.value.code, bool(re.search(message, capsys.readouterr().err))) == (2, True)


@pytest.mark.parametrize("nproc", ["0", "1"])
def test_usage_error_on_the_command_line_exits_2_before_starting_a_rank(tmp_path: Path, nproc: str) -> None:
    script = _script(tmp_path, "publish_pid()\n")

    code, _, err = _run(tmp_path, "--nproc_per_node", nproc, str(script), str(tmp_path))

    assert (code, err.splitlines()[-1], _pids(tmp_path)) == (
        2,
        f"python -m openfl_api.launch: error: nproc_per_node must be >= 2 when nnodes is 1, got {nproc}; "
        "a federation needs the backend and at least one frontend: pass --nproc_per_node 2 or more",
        [],
    ), err


def test_a_node_of_several_may_run_a_single_rank(tmp_path: Path) -> None:
    launched = _launched(tmp_path, DUMP_ENV, "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "1",
                         "--master_port", "29557", env={"OPENFL_API_TOKEN": TOKEN})

    assert (launched.code, launched.env(1)["RANK"], launched.env(1)["WORLD_SIZE"], _said(launched.err)[0]) == (
        0, "1", "2", f"{L} starting rank 1 of world_size 2 (master 127.0.0.1:PORT)"
    ), launched.err


def test_nodes_may_run_different_numbers_of_ranks(tmp_path: Path) -> None:
    launched = _launched(tmp_path, DUMP_ENV, "--nnodes", "3", "--node_rank", "2", "--nproc_per_node", "1,4,3",
                         "--master_port", "29558", env={"OPENFL_API_TOKEN": TOKEN})

    assert launched.code == 0, launched.err
    assert [(launched.env(r)["RANK"], launched.env(r)["LOCAL_RANK"], launched.env(r)["WORLD_SIZE"],
             launched.env(r)["LOCAL_WORLD_SIZE"]) for r in (5, 6, 7)] == [
        ("5", "0", "8", "3"), ("6", "1", "8", "3"), ("7", "2", "8", "3")]


@pytest.mark.parametrize("counts,nnodes", [("1,4", "3"), ("1,0,2", "3"), ("2,x", "2")])
def test_a_per_node_list_that_does_not_fit_is_a_usage_error(tmp_path: Path, counts: str, nnodes: str) -> None:
    script = _script(tmp_path, SLEEP)
    done = subprocess.run([sys.executable, "-m", "openfl_api.launch", "--nnodes", nnodes, "--nproc_per_node", counts,
                           "--master_port", "29559", str(script), str(tmp_path)],
                          env=_env({"OPENFL_API_TOKEN": TOKEN}), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 2
    assert "one count >= 1 per node" in done.stderr or "one per node such as 1,4,4" in done.stderr, done.stderr


def test_importing_the_launcher_does_not_import_torch() -> None:
    # The launcher only starts and watches processes; loading torch would delay every launch.
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, openfl_api.launch; print('torch' in sys.modules)"],
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=True,
    )

    assert imported.stdout == "False\n", imported.stderr
