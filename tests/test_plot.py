"""python -m openfl_api.plot: a PNG from the records of two runs, its axes, and its mistakes.
(tests/distributed/test_records.py runs the command itself on the README demo's record.)"""

from __future__ import annotations

import json

import pytest

import openfl_api as ofl
from openfl_api.errors import ConfigurationError
from openfl_api.plot import main, plot
from recorded import federation

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    paths = [folder / "short.jsonl", folder / "long.jsonl"]
    for path, versions in zip(paths, (2, 4)):
        federation(record=str(path), versions=versions, steps=[ofl.FederatedEvaluation(every=1)])
    return paths


def test_the_plot_of_two_runs_has_each_metric_against_version_and_time_with_a_line_per_run(records, tmp_path):
    output = tmp_path / "runs.png"
    figure = plot(records, output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(output)).shape
    assert (width, height) == (1100, int(100 * (2.6 * 3 + 0.6)))
    axes = figure.axes
    assert len(axes) == 3 * 2
    assert [a.get_ylabel() for a in axes] == ["train/loss"] * 2 + ["federated/accuracy"] * 2 + ["federated/loss"] * 2
    assert [a.get_xlabel() for a in axes] == ["version", "time served (s)"] * 3
    assert [axes[0].get_title(), axes[1].get_title()] == ["against the version", "against time"]
    for axis in axes:
        assert [line.get_label() for line in axis.get_lines()] == ["short", "long"]
    short, long = axes[2].get_lines()  # federated/accuracy against the version: versions 0.. and the final one
    assert list(short.get_xdata()) == [0, 1, 2] and list(long.get_xdata()) == [0, 1, 2, 3, 4]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["short", "long"]


def test_the_command_writes_the_png_next_to_the_first_record_and_picks_metrics(records, capsys):
    assert main([str(records[1]), str(records[0]), "--metrics", "federated/accuracy"]) == 0
    assert records[1].with_suffix(".png").exists()
    assert capsys.readouterr().out == f"[openfl_api.plot] wrote {records[1].with_suffix('.png')} (1 metric of 2 records)\n"


def test_the_command_names_what_is_wrong(records, tmp_path, capsys):
    assert main([str(records[0]), "--metrics", "train/accuracy"]) == 2
    assert ("error: no record holds train/accuracy; they hold train/loss, federated/accuracy, federated/loss"
            in capsys.readouterr().err)
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "error: cannot read the record" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"schema": 1, "event": "run", "version": 0, "elapsed": 0.0}) + "\n")
    with pytest.raises(ConfigurationError, match="no metrics to plot in .*empty.jsonl"):
        plot([empty], tmp_path / "e.png")
    with pytest.raises(ConfigurationError, match="give at least one record"):
        plot([], tmp_path / "e.png")
