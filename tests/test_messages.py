"""Every option and argument an error or log message of the package names exists.

The messages are found in the source: string literals passed to an exception, a log call, or a
usage error. ``--name`` must be an option of the launcher, of ``openfl_api.parser`` or of
``python -m openfl_api.simulate``; ``Name(arg=...)`` must name a parameter of a public callable.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

import openfl_api as ofl
from openfl_api import aggregate, parser, simulate
from openfl_api.launch import config as launch_config

PACKAGE = Path(ofl.__file__).parent
LOG_CALLS = {"debug", "info", "warning", "error", "critical", "exception", "log", "say", "_say"}


def _text(node: ast.AST) -> str:
    """The literal text of a string expression; formatted values become a placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(value) if isinstance(value, ast.Constant) else "\x00" for value in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left) + _text(node.right)
    return ""


def messages() -> Iterator[Tuple[str, int, str]]:
    """``(file, line, text)`` of the strings passed to raises, log calls and usage errors."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if not (name.endswith("Error") or name in LOG_CALLS):
                continue
            for argument in node.args:
                inside = {id(c) for part in ast.walk(argument) if isinstance(part, (ast.JoinedStr, ast.BinOp))
                          for c in ast.iter_child_nodes(part)}
                for part in ast.walk(argument):
                    text = "" if id(part) in inside else _text(part)
                    if text:
                        yield str(path.relative_to(PACKAGE.parent)), node.lineno, text


def _options() -> set:
    found = set()
    for build in (launch_config._build_parser, parser.build_parser, simulate._build_parser):
        for action in build()._actions:
            found.update(action.option_strings)
    return found


OPTIONS = _options()
MESSAGES: List[Tuple[str, int, str]] = list(messages())
CALLABLES = {name: getattr(ofl, name) for name in ofl.__all__ if callable(getattr(ofl, name, None))}
CALLABLES.update({name: getattr(aggregate, name) for name in aggregate.__all__})


def test_messages_were_found() -> None:
    assert len(MESSAGES) > 100


@pytest.mark.parametrize("where,line,text", [m for m in MESSAGES if re.search(r"(?<![\w-])--[a-z]", m[2])],
                         ids=lambda value: str(value)[:40])
def test_every_option_a_message_names_exists(where: str, line: int, text: str) -> None:
    for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text):
        assert option in OPTIONS, f"{where}:{line} names {option}, which no command has"


@pytest.mark.parametrize("where,line,text", [m for m in MESSAGES if re.search(r"\b[A-Z]\w*\(\w+=", m[2])],
                         ids=lambda value: str(value)[:40])
def test_every_argument_a_message_names_exists(where: str, line: int, text: str) -> None:
    for name, argument in re.findall(r"\b([A-Z]\w*)\((\w+)=", text):
        if name not in CALLABLES:
            continue
        target = CALLABLES[name]
        # A class's own __init__: the Step metaclass hides constructor signatures from inspect.
        parameters = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
        assert argument in parameters, f"{where}:{line} names {name}({argument}=...), which has no such parameter"


def test_the_check_catches_an_option_that_does_not_exist() -> None:
    assert "--token" not in OPTIONS
