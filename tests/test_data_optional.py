"""Tests that matplotlib and scikit-learn stay optional: imported on use, with the fix when missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import openfl_api
from openfl_api import data

ROOT = Path(openfl_api.__file__).resolve().parent.parent


def test_importing_the_data_package_imports_neither_matplotlib_nor_sklearn() -> None:
    code = "import sys, openfl_api as ofl; ofl.data.iid; print(sorted({'matplotlib', 'sklearn'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_the_data_package_is_a_lazy_attribute_of_the_package() -> None:
    assert openfl_api.data is data and "data" in openfl_api.__all__


@pytest.mark.parametrize("module", ["matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"])
def test_plot_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"plot_label_distribution\(\) needs matplotlib, which is not installed: pip install 'openfl_api\[plot\]' \(or pip install matplotlib\)"):
        data.plot_label_distribution([np.array([0, 1])], np.array([0, 1]), tmp_path / "x.png")


def test_digits_without_sklearn_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"load_digits\(\) needs scikit-learn, which is not installed: pip install 'openfl_api\[digits\]' \(or pip install scikit-learn\)"):
        data.load_digits(seed=0)


def test_a_missing_dependency_chains_the_original_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError) as caught:
        data.load_digits(seed=0)
    assert isinstance(caught.value.__cause__, ImportError)
