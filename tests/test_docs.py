"""The README and docs/ speak to users about what is true now.

Log lines quoted in them are checked against real runs by tests/distributed/test_docs_log_lines.py;
these checks need no process: the front door's commands, no history or diary in the docs, and the
table of events in docs/steps.rst against :class:`openfl_api.step.Event`.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from openfl_api.step import Event

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.rst"))


def fenced_blocks(text: str, language: str) -> list:
    """The bodies of the ```language fenced blocks of a Markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def test_the_readme_gives_one_command_for_the_demo_and_one_for_the_tests():
    commands = [line for block in fenced_blocks(README.read_text(encoding="utf-8"), "bash")
                for line in block.splitlines() if line.strip()]
    demo = [c for c in commands if "python -m openfl_api.launch" in c]
    assert len(demo) == 1 and demo[0].startswith("pip install ") and "--logdir logs demo.py" in demo[0], commands
    assert "bash .ci/run" in commands, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install" in ci and re.search(r"^python -m pytest\s*$", ci, flags=re.M), ci


def test_the_docs_hold_no_developer_diary():
    assert not (ROOT / "docs" / "NOTES.md").exists()
    assert not [p.name for p in (ROOT / "docs").glob("*.md")]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_a_page_states_decisions_without_dates_or_history(page):
    text = page.read_text(encoding="utf-8")
    for pattern in (r"\b20\d\d-\d\d-\d\d\b",            # a date
                    r"\bsession \d", r"\bsessions? of\b",  # development sessions
                    r"\bthe issue\b", r"\bissue \d",     # the tracker
                    r"DESIGN\.md", r"NOTES\.md",          # files outside the docs
                    r"\bwhere [^.]* (was|were) silent\b"):
        found = re.search(pattern, text, flags=re.I)
        assert found is None, f"{page.name}: {found.group(0)!r} in {text[max(0, found.start() - 80):found.end() + 80]!r}"


def test_the_table_of_events_in_the_steps_page_lists_every_event_once():
    text = (ROOT / "docs" / "steps.rst").read_text(encoding="utf-8")
    table = text[text.index("   * - event (method)"):text.index("Order within a request")]
    listed = re.findall(r"^   \* - ``(\w+)\(", table, flags=re.M)
    assert listed == [event.value for event in Event]


def strategies_commands() -> list:
    """The arguments of every examples/strategies_federation.py command in docs/strategies.rst."""
    text = (ROOT / "docs" / "strategies.rst").read_text(encoding="utf-8").replace("\\\n", " ")
    variables, commands = {}, []
    for line in (line.strip() for line in text.splitlines()):
        assignment = re.fullmatch(r'(\w+)="(.*)"', line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        line = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line)
        if line.startswith("python -m openfl_api.") and "strategies_federation.py" in line:
            words = shlex.split(line)
            commands.append(words[words.index("examples/strategies_federation.py") + 1:])
    return commands


def test_the_strategies_page_gives_a_command_for_every_algorithm_and_each_parses():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import strategies_federation
    finally:
        sys.path.remove(str(ROOT / "examples"))
    parser = strategies_federation.build_parser()
    algorithms = [parser.parse_args(argv).algorithm for argv in strategies_commands()]
    assert sorted(set(algorithms)) == sorted(strategies_federation.ALGORITHMS)
