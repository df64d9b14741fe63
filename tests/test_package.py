"""Tests of the package surface: __all__ of the package and of every module, and the error tree."""

from __future__ import annotations

import builtins
import importlib
import pkgutil
import re
from types import ModuleType
from typing import List, Tuple

import pytest

import openfl_api
from openfl_api import errors


def module_names() -> List[str]:
    """Every module and subpackage of openfl_api, found on disk (launch only once it exists)."""
    return sorted(info.name for info in pkgutil.walk_packages(openfl_api.__path__, prefix="openfl_api."))


MODULES = module_names()


def test_the_core_modules_are_found() -> None:
    assert {"openfl_api.payload", "openfl_api.address", "openfl_api.transport.rendezvous"} <= set(MODULES)


@pytest.mark.parametrize("name", openfl_api.__all__)
def test_every_name_in_the_package_all_exists(name: str) -> None:
    assert hasattr(openfl_api, name)


@pytest.mark.parametrize("name", openfl_api.__all__)
def test_every_name_in_the_package_all_is_importable(name: str) -> None:
    namespace: dict = {}
    exec(f"from openfl_api import {name}", namespace)
    assert namespace[name] is getattr(openfl_api, name)


@pytest.mark.parametrize("name", [n for n in openfl_api.__all__ if isinstance(getattr(openfl_api, n), ModuleType)])
def test_submodules_in_the_package_all_are_importable_by_path(name: str) -> None:
    assert importlib.import_module(f"openfl_api.{name}") is getattr(openfl_api, name)


REEXPORTED = [n for n in openfl_api.__all__ if hasattr(getattr(openfl_api, n), "__module__")]


@pytest.mark.parametrize("name", REEXPORTED)
def test_every_name_the_package_reexports_is_in_its_own_module_all(name: str) -> None:
    home = importlib.import_module(getattr(openfl_api, name).__module__)
    assert name in getattr(home, "__all__", ())


def test_package_all_has_no_duplicates() -> None:
    assert len(openfl_api.__all__) == len(set(openfl_api.__all__))


@pytest.mark.parametrize("module_name", MODULES)
def test_every_module_imports(module_name: str) -> None:
    importlib.import_module(module_name)


@pytest.mark.parametrize("module_name", MODULES)
def test_every_name_in_a_module_all_exists(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
    assert missing == []


@pytest.mark.parametrize("module_name", MODULES)
def test_a_module_all_has_no_duplicates(module_name: str) -> None:
    names = list(getattr(importlib.import_module(module_name), "__all__", ()))
    assert len(names) == len(set(names))


# --- the error tree ----------------------------------------------------------------------------


def documented_tree() -> List[Tuple[str, str, str]]:
    """``(error, parent error, builtin or "")`` for each line of the tree in the errors docstring."""
    rows = []
    stack: List[Tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^(\s*(?:\|\s*)*)\+-- (\w+)(?: \((\w+)\))?", line)
        root = re.match(r"^\s*(OpenFLError)\s*$", line)
        if root:
            stack = [(-1, "OpenFLError")]
        elif match:
            depth = len(match.group(1))
            while stack and stack[-1][0] >= depth:
                stack.pop()
            rows.append((match.group(2), stack[-1][1], match.group(3) or ""))
            stack.append((depth, match.group(2)))
    return rows


TREE = documented_tree()


def test_the_docstring_tree_names_every_error() -> None:
    assert sorted(name for name, _, _ in TREE) == sorted(n for n in errors.__all__ if n != "OpenFLError")


@pytest.mark.parametrize("name,parent,builtin", TREE, ids=[row[0] for row in TREE])
def test_each_error_subclasses_its_documented_parent(name: str, parent: str, builtin: str) -> None:
    assert issubclass(getattr(errors, name), getattr(errors, parent))


@pytest.mark.parametrize("name,parent,builtin", [row for row in TREE if row[2]], ids=[row[0] for row in TREE if row[2]])
def test_each_error_subclasses_its_documented_builtin(name: str, parent: str, builtin: str) -> None:
    assert issubclass(getattr(errors, name), getattr(builtins, builtin))


@pytest.mark.parametrize(
    "name,builtin",
    [("ConfigurationError", ValueError), ("AddressError", ValueError), ("RoleError", RuntimeError),
     ("PayloadError", ValueError), ("AdmissionError", PermissionError), ("TransportError", ConnectionError),
     ("StepError", RuntimeError)],
)
def test_each_error_can_be_caught_as_its_builtin(name: str, builtin: type) -> None:
    args = ("step", "event", "message") if name == "StepError" else ("message",)
    with pytest.raises(builtin):
        raise getattr(errors, name)(*args)


def test_step_error_names_the_step_and_event() -> None:
    error = errors.StepError("Checkpoint", "after_upload", "disk full")
    assert (str(error), error.step_name, error.event) == (
        "step 'Checkpoint' raised at after_upload: disk full", "Checkpoint", "after_upload",
    )
