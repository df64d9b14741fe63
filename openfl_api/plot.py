"""Draw the metrics of runs from their records: ``python -m openfl_api.plot run.jsonl [more.jsonl ...]``.

Writes one PNG: a row per metric, the metric against the version on the left and against the time
the backend served on the right (the record's ``elapsed``), one line per record, labelled by its
file name, so several runs overlay. The metrics are the means the records hold: ``train/<name>``
(the accepted uploads of each version), ``federated/<name>`` (the frontends' evaluations),
``centralized/<name>`` and any kind given to ``api.log_metrics``.

Usage
-----

::

    python -m openfl_api.plot run.jsonl [more.jsonl ...] [--output FILE.png] [--metrics NAME ...]

``--output`` defaults to the first record's path with ``.png``; ``--metrics`` picks the rows
(``train/loss federated/accuracy``), by default every metric found, at most :data:`MAX_ROWS`.
Needs matplotlib: ``pip install 'openfl_api[plot]'``. Exit codes: 0 when the PNG was written, 2
for a usage error or a file that is not a record (the message names the line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from openfl_api.errors import ConfigurationError
from openfl_api.record import read_record, series

__all__ = ["plot", "main", "MAX_ROWS"]

#: Rows drawn when ``--metrics`` does not choose them.
MAX_ROWS = 8
_PREFIX = "[openfl_api.plot]"
_ORDER = ("train", "federated", "centralized")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigurationError("plotting needs matplotlib: pip install 'openfl_api[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _labels(records: Sequence[Path]) -> List[str]:
    stems = [path.stem for path in records]
    return stems if len(set(stems)) == len(stems) else [str(path) for path in records]


def _sort_key(name: str) -> tuple:
    kind = name.split("/", 1)[0]
    return (_ORDER.index(kind) if kind in _ORDER else len(_ORDER), name)


def plot(records: Sequence[Union[str, Path]], output: Union[str, Path], metrics: Optional[Sequence[str]] = None) -> Any:
    """Draw ``records`` into the PNG ``output``; returns the matplotlib figure (closed).

    Args:
        records: paths of record files (:mod:`openfl_api.record`), one line each per metric.
        output: the PNG to write.
        metrics: the metrics to draw (``"train/loss"``); default every one found, at most
            :data:`MAX_ROWS`.

    Raises:
        ConfigurationError: no record given, a metric asked for that no record holds, no metric
            at all, or matplotlib missing.
        RecordError: a file is not a record.
    """
    paths = [Path(p) for p in records]
    if not paths:
        raise ConfigurationError("give at least one record to plot, e.g. python -m openfl_api.plot run.jsonl")
    found: List[Dict[str, List[tuple]]] = [series(read_record(path)) for path in paths]
    available = sorted({name for runs in found for name in runs}, key=_sort_key)
    if not available:
        raise ConfigurationError(f"no metrics to plot in {', '.join(map(str, paths))}: the records hold no version "
                                 "or evaluation with metrics (report metrics with upload(metrics=...) or evaluate)")
    if metrics:
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise ConfigurationError(f"no record holds {', '.join(unknown)}; they hold {', '.join(available)}")
        rows = list(metrics)
    else:
        rows = available[:MAX_ROWS]
    plt = _pyplot()
    figure, axes = plt.subplots(len(rows), 2, figsize=(11, 2.6 * len(rows) + 0.6), squeeze=False)
    for row, name in enumerate(rows):
        by_version, by_time = axes[row]
        for label, runs in zip(_labels(paths), found):
            points = runs.get(name)
            if not points:
                continue
            points = sorted(points)
            style = "o-" if len(points) <= 30 else "-"
            by_version.plot([p[0] for p in points], [p[2] for p in points], style, markersize=3, label=label)
            by_time.plot([p[1] for p in points], [p[2] for p in points], style, markersize=3, label=label)
        for axis, xlabel in ((by_version, "version"), (by_time, "time served (s)")):
            axis.set_xlabel(xlabel)
            axis.set_ylabel(name)
            axis.grid(True, alpha=0.3)
        if row == 0:
            by_version.set_title("against the version")
            by_time.set_title("against time")
            by_version.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(str(output), dpi=100)
    plt.close(figure)
    return figure


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m openfl_api.plot",
                                     description="Draw the metrics of runs from their records into a PNG.")
    parser.add_argument("records", nargs="+", type=Path, help="record files (JSON Lines) written with --record")
    parser.add_argument("--output", "-o", type=Path, default=None, help="the PNG (default: the first record's name "
                                                                         "with .png)")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help="metrics to draw, e.g. train/loss federated/accuracy (default: every one found)")
    options = parser.parse_args(argv)
    output = options.output or options.records[0].with_suffix(".png")
    try:
        figure = plot(options.records, output, options.metrics)
    except ConfigurationError as exc:
        print(f"{_PREFIX} error: {exc}", file=sys.stderr)
        return 2
    rows = len(figure.axes) // 2
    print(f"{_PREFIX} wrote {output} ({rows} metric{'s' if rows != 1 else ''} of {len(options.records)} "
          f"record{'s' if len(options.records) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
