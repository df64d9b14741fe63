"""Imports of optional dependencies, with an error that says which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, package: str, needed_by: str) -> ModuleType:
    """Imports ``module`` or raises ImportError naming the extra and the package to install.

    Args:
        module: module to import, e.g. ``"matplotlib.figure"``.
        extra: openfl_api extra that installs it, e.g. ``"plot"``.
        package: pip name of the dependency, e.g. ``"matplotlib"``.
        needed_by: what needs it, for the message, e.g. ``"plot_label_distribution()"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{needed_by} needs {package}, which is not installed: pip install 'openfl_api[{extra}]' "
            f"(or pip install {package})"
        ) from error
