"""Every log line that README.md and docs/*.rst quote is one a real run prints.

**How a line is quoted.** The docs quote what a user sees only in one of three shapes, each on a
line of its own (a literal block in reST, a fenced block in Markdown); any line of those files, in
any place, that has one of these shapes is checked:

- a log line in the format of the launcher's log files and of ``ofl.logger.log_level``::

      ... | INFO     | backend:0 | openfl_api.backend.exchange:321 - version 1: aggregated 2 uploads

  The time is written ``...``. The level, the ``role:rank`` and the module must be the real ones;
  the line number is not compared (code moves; the module says where a line comes from).
- a line of the launcher: ``[openfl_api.launch] rank 3 exited with code 3; ...``;
- the last line of a traceback: ``openfl_api.errors.TransportError: no backend at ...``.

**Placeholders** in the message (the text after `` - ``, after the launcher's tag, after the
exception's name): every number matches any number (versions, counts, ports, seconds, line
numbers differ from run to run), and ``...`` matches any text, including none. Everything else
must be equal, character for character. To stay checkable, a quoted message that elides text with
``...`` keeps at least three words of its own.

**The runs**, all started at once, once for the module (about 20 s on two CPUs, most of it
importing torch in eleven processes):

- the README's demo command, as written, in a folder holding ``demo.py``;
- the asynchronous demo (``demo.py --asynchronous``, three ranks);
- a stalled version (``scripts/mistakes.py``, the script of ``test_mistakes.py``): three ranks,
  ``AggregateCount(2)``, rank 2 built with a smaller model, so the backend refuses it and version 0
  waits for its upload; stopped with Ctrl-C once the backend and rank 1 have said what they wait
  for and rank 2 has failed;
- a frontend started with no backend (``connect_timeout`` 2 s);
- ``python demo.py`` started by hand with no rank, stopped with Ctrl-C once it serves;
- ``examples/digits_evaluation.py --rounds 2`` under ``python -m openfl_api.simulate`` (federated
  and centralized evaluation, the final model's evaluation).

Each quoted line must match a line of the same shape in one of their outputs.
"""

from __future__ import annotations

import difflib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from test_federation import ROOT, Processes, child_env, free_port
from test_mistakes import STARTUP, wait_for_line

MISTAKES = Path(__file__).with_name("scripts") / "mistakes.py"
DEMO = ROOT / "demo.py"
EVALUATION = ROOT / "examples" / "digits_evaluation.py"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]
RUN_DEADLINE = 90.0  # a scenario that runs to its end

LOG_LINE = re.compile(r"^(?P<time>.*?) \| (?P<level>[A-Z]+) *\| (?P<who>[\w-]+:[\w-]+) \| "
                      r"(?P<module>[\w.]+):(?P<line>\d+|\.\.\.) - (?P<message>.*)$")
LAUNCHER_LINE = re.compile(r"^\[openfl_api\.launch\] (?P<message>.*)$")
ERROR_LINE = re.compile(r"^(?P<error>openfl_api\.errors\.\w+): (?P<message>.*)$")
PLACEHOLDER = re.compile(r"(\.\.\.|\d+)")


@dataclass(frozen=True)
class Line:
    """A line of one of the three shapes: ``key`` says which shape and, for a log line, its level,
    ``role:rank`` and module; ``message`` is the rest."""

    key: Tuple[str, ...]
    message: str
    at: str = ""  # a log line's source line number ("..." in a quote: any)


def parse(text: str) -> Optional[Line]:
    """The shape and message of ``text`` (stripped), or None when it has none of the three shapes."""
    text = text.strip()
    found = LOG_LINE.match(text)
    if found:
        return Line(("log", found["level"], found["who"], found["module"]), found["message"], found["line"])
    found = LAUNCHER_LINE.match(text)
    if found:
        return Line(("launcher",), found["message"])
    found = ERROR_LINE.match(text)
    if found:
        return Line(("error", found["error"]), found["message"])
    return None


def pattern(message: str) -> re.Pattern:
    """A quoted message as a regular expression: numbers match any number, ``...`` any text."""
    parts = []
    for part in PLACEHOLDER.split(message):
        if part == "...":
            parts.append(".*?")
        elif part.isdigit():
            parts.append(r"\d+")
        else:
            parts.append(re.escape(part))
    return re.compile("".join(parts))


def own_words(message: str) -> List[str]:
    """The words of a quoted message that are not placeholders."""
    return re.findall(r"[A-Za-z]{2,}", PLACEHOLDER.sub(" ", message))


@dataclass(frozen=True)
class Quoted:
    where: str  # "docs/steps.rst:12"
    line: Line

    def matches(self, real: Line) -> bool:
        return (real.key == self.line.key and self.line.at in ("...", real.at)
                and pattern(self.line.message).fullmatch(real.message) is not None)


def quoted_lines() -> List[Quoted]:
    """Every line of README.md and docs/*.rst that has one of the three shapes."""
    found = []
    for document in DOCUMENTS:
        for number, text in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
            line = parse(text)
            if line is not None:
                found.append(Quoted(f"{document.relative_to(ROOT)}:{number}", line))
    return found


QUOTED = quoted_lines()


# ----------------------------------------------------------------------------- the runs


def _start(processes: Processes, cwd: Path, args: List[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``args`` in ``cwd`` (as a user would, so relative paths in its output read the same)."""
    cwd.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(args, cwd=cwd, env=child_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    processes.started.append(process)
    return process


def _launch(processes: Processes, folder: Path, nproc: int, script: Path, *args: str) -> subprocess.Popen:
    """``python -m openfl_api.launch --nproc_per_node N --logdir logs script`` run in ``folder``."""
    command = [sys.executable, "-m", "openfl_api.launch", "--nproc_per_node", str(nproc), "--logdir", "logs",
               "--grace", "3", str(script), *args]
    return _start(processes, folder, command, folder / "launcher.log")


def _exit(process: subprocess.Popen, seconds: float, what: str) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} did not exit within {seconds} s") from None


def _interrupt(process: subprocess.Popen, what: str) -> int:
    process.send_signal(signal.SIGINT)
    return _exit(process, 10.0, what)


def readme_demo() -> List[str]:
    """The arguments of the launcher in the README's demo command (``pip install ... && python -m
    openfl_api.launch ARGS``)."""
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        found = re.search(r"python -m openfl_api\.launch (.*)$", line)
        if found:
            return shlex.split(found.group(1))
    raise AssertionError("README.md gives no python -m openfl_api.launch command")


def run_scenarios(base: Path) -> Dict[str, List[Line]]:
    """Run every scenario once; return, per output file, the lines of the three shapes it holds."""
    processes = Processes()
    try:
        # Every scenario at once: most of their time is spent waiting, not computing.
        # The README's command, as given, in a folder holding demo.py.
        (base / "demo").mkdir()
        shutil.copy(DEMO, base / "demo" / "demo.py")
        demo = _start(processes, base / "demo", [sys.executable, "-m", "openfl_api.launch", *readme_demo()],
                      base / "demo" / "launcher.log")
        # Rank 2 builds a smaller model: it is refused, and version 0 waits for its upload.
        stalled = _launch(processes, base / "stalled", 3, MISTAKES, "--count", "2", "--small_rank", "2",
                          "--status", "1")
        asynchronous = _launch(processes, base / "asynchronous", 3, DEMO, "--asynchronous")
        evaluation = _start(processes, base / "evaluation", [sys.executable, "-m", "openfl_api.simulate",
                                                             str(EVALUATION), "--rounds", "2"],
                            base / "evaluation" / "simulate.log")
        no_rank = _start(processes, ROOT, [sys.executable, "demo.py"], base / "no_rank.log",
                         MASTER_PORT=str(free_port()))
        no_backend = _start(processes, base, [sys.executable, str(MISTAKES), "--connect", "2"], base / "no_backend.log",
                            RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        wait_for_line(base / "no_rank.log", r"serve loop started at version 0", STARTUP, no_rank)
        _interrupt(no_rank, "demo.py started with no rank")
        stalled_logs = base / "stalled" / "logs"
        wait_for_line(stalled_logs / "rank_0.log", r"WARNING .* The connected frontends cannot complete it", STARTUP, stalled)
        wait_for_line(stalled_logs / "rank_1.log", r"still waiting for the model of version 1", STARTUP, stalled)
        wait_for_line(base / "stalled" / "launcher.log", r"rank 2 exited with code 1", STARTUP, stalled)
        assert _interrupt(stalled, "the stalled federation") == 128 + signal.SIGINT
        assert _exit(no_backend, STARTUP, "the frontend with no backend") == 1
        assert _exit(demo, RUN_DEADLINE, "the demo") == 0, (base / "demo" / "launcher.log").read_text()
        assert _exit(asynchronous, RUN_DEADLINE, "the asynchronous demo") == 0
        assert _exit(evaluation, RUN_DEADLINE, "the evaluation example") == 0, (
            base / "evaluation" / "simulate.log").read_text()[-3000:]
    finally:
        processes.reap()
    outputs: Dict[str, List[Line]] = {}
    for path in sorted(base.rglob("*.log")):
        lines = [parse(text) for text in path.read_text(errors="replace").splitlines()]
        outputs[str(path.relative_to(base))] = [line for line in lines if line is not None]
    return outputs


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Dict[str, List[Line]]:
    started = time.monotonic()
    outputs = run_scenarios(tmp_path_factory.mktemp("docs_runs"))
    print(f"the scenarios ran in {time.monotonic() - started:.1f} s")
    return outputs


# ----------------------------------------------------------------------------- the checks


def test_the_docs_quote_log_lines_in_the_checked_shapes():
    where = {q.where.split(":")[0] for q in QUOTED}
    assert {"README.md", "docs/quickstart.rst"} <= where, sorted(where)
    assert len(QUOTED) >= 20, [q.where for q in QUOTED]


@pytest.mark.parametrize("quoted", QUOTED, ids=[q.where for q in QUOTED])
def test_a_quoted_line_keeps_enough_words_of_its_own_to_be_checked(quoted):
    words = own_words(quoted.line.message)
    enough = 3 if "..." in quoted.line.message else 1
    assert len(words) >= enough, f"{quoted.where}: {quoted.line.message!r} is mostly placeholders"


@pytest.mark.parametrize("quoted", QUOTED, ids=[q.where for q in QUOTED])
def test_a_quoted_line_is_printed_by_a_real_run(real, quoted):
    for lines in real.values():
        if any(quoted.matches(line) for line in lines):
            return
    def shown(line: Line) -> str:
        return f"{' '.join(line.key[1:])}{':' + line.at if line.at else ''} - {line.message}"

    real_shown = {shown(line) for lines in real.values() for line in lines if line.key[0] == quoted.line.key[0]}
    close = difflib.get_close_matches(shown(quoted.line), sorted(real_shown), n=3, cutoff=0.3)
    raise AssertionError(
        f"{quoted.where} quotes a line that no real run printed (module, line number and message):\n  "
        f"{shown(quoted.line)}\nclosest real lines of that shape:\n" + "\n".join(f"  {c}" for c in close or ["(none)"])
    )


def test_a_line_altered_by_one_word_matches_no_real_line(real):
    # The check must be able to fail: a quoted line with one of its own words changed matches nothing.
    everything = [line for lines in real.values() for line in lines]
    for quoted in QUOTED:
        word = own_words(quoted.line.message)[-1]
        altered = Quoted(quoted.where, Line(quoted.line.key, quoted.line.message.replace(word, word + "x", 1)))
        assert not any(altered.matches(line) for line in everything), f"{quoted.where}: altered, it still matches"


def test_numbers_and_ellipses_are_the_only_placeholders_and_the_source_line_must_match():
    line = parse("... | INFO     | backend:0 | openfl_api.backend.exchange:321 - version 1: aggregated 2 uploads")
    real = parse("2026-01-01 10:00:00.000 | INFO     | backend:0 | openfl_api.backend.exchange:321 - "
                 "version 12: aggregated 3 uploads")
    assert Quoted("x", line).matches(real)
    assert not Quoted("x", Line(line.key, "version 1: aggregated 2 upload", "321")).matches(real)
    assert not Quoted("x", Line(("log", "WARNING", "backend:0", "openfl_api.backend.exchange"), line.message,
                                "321")).matches(real)
    assert Quoted("x", Line(line.key, "version 1: ...", "321")).matches(real)
    assert not Quoted("x", Line(line.key, line.message, "99")).matches(real)  # the source line is checked too
    assert Quoted("x", Line(line.key, line.message, "...")).matches(real)
    assert parse("[openfl_api.launch] no rank failed") == Line(("launcher",), "no rank failed")
    assert parse("openfl_api.errors.TransportError: no backend") == Line(("error", "openfl_api.errors.TransportError"),
                                                                         "no backend")
    assert parse("version 1: aggregated 2 uploads") is None
