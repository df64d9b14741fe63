"""Tests of the partition report: the per-client label table and the stacked-bar PNG."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from openfl_api import data
from openfl_api.errors import ConfigurationError

LABELS = np.array([0, 1, 1, 2, 2, 2])
PARTS = [np.array([0, 3]), np.array([1, 2, 4, 5])]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def rows(table: str) -> list:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]


# --- table -------------------------------------------------------------------------------------


def test_table_has_a_row_per_client_and_a_total() -> None:
    assert rows(data.label_table(PARTS, LABELS)) == [
        ["client", "size", "0", "1", "2"],
        ["0", "2", "1", "0", "1"],
        ["1", "4", "0", "2", "2"],
        ["total", "6", "1", "2", "3"],
    ]


def test_table_names_classes() -> None:
    assert rows(data.label_table(PARTS, LABELS, class_names=["cat", "dog", "eel"]))[0] == ["client", "size", "cat", "dog", "eel"]


def test_table_pads_to_num_classes() -> None:
    assert rows(data.label_table(PARTS, LABELS, num_classes=4))[0][-1] == "3"


def test_table_refuses_class_names_of_another_length() -> None:
    with pytest.raises(ConfigurationError, match=r"one name per label, 3; got 2"):
        data.label_table(PARTS, LABELS, class_names=["cat", "dog"])


def test_partition_table_is_the_label_table() -> None:
    assert data.Partition(PARTS).table(LABELS) == data.label_table(PARTS, LABELS)


# --- plot --------------------------------------------------------------------------------------


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install 'openfl_api[plot]'")


def test_plot_writes_a_png(matplotlib, tmp_path: Path) -> None:
    path = data.plot_label_distribution(PARTS, LABELS, tmp_path / "labels.png")
    assert path == tmp_path / "labels.png" and png_size(path) == (600, 450)


def test_plot_of_proportions_writes_a_png(matplotlib, tmp_path: Path) -> None:
    parts = data.dirichlet(np.repeat(np.arange(10), 100), 50, 0.1, seed=0)
    path = data.plot_label_distribution(parts, np.repeat(np.arange(10), 100), tmp_path / "p.png", proportions=True, title="t")
    assert png_size(path)[0] > 600


def test_plot_with_many_labels_writes_a_png(matplotlib, tmp_path: Path) -> None:
    labels = np.arange(300) % 30
    assert png_size(data.plot_label_distribution(data.iid(300, 5, seed=0), labels, str(tmp_path / "many.png")))[1] == 450


def test_plot_through_the_partition(matplotlib, tmp_path: Path) -> None:
    path = data.Partition(PARTS).plot(LABELS, tmp_path / "x.png", class_names=["a", "b", "c"], dpi=50)
    assert png_size(path) == (300, 225)


def test_plot_leaves_pyplot_alone(matplotlib, tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    data.plot_label_distribution(PARTS, LABELS, tmp_path / "labels.png")
    assert matplotlib.get_backend() == backend


def test_plot_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"the folder of path must exist; .*nope"):
        data.plot_label_distribution(PARTS, LABELS, tmp_path / "nope" / "labels.png")
