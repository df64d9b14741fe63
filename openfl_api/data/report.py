"""What a partition looks like: a per-client table of label counts and a stacked-bar PNG.

The table needs only prettytable. The plot needs matplotlib, an optional extra
(``pip install 'openfl_api[plot]'``), imported when :func:`plot_label_distribution` is called;
it draws with the Agg backend on its own figure, so pyplot's global state is left alone.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
from prettytable import PrettyTable

from openfl_api.data._optional import require
from openfl_api.data.functional import label_counts
from openfl_api.errors import ConfigurationError

__all__ = ["label_table", "plot_label_distribution"]


def label_table(
    indices: Sequence[Any],
    labels: Any,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
) -> str:
    """Renders one row per client (client, size, samples of each label) and a total row.

    Args:
        indices: one index array per client, as the partitioners return.
        labels: label of every sample, integers in ``[0, num_classes)``.
        num_classes: number of label columns; defaults to ``max(labels) + 1``.
        class_names: column titles, one per label; defaults to ``"0"``, ``"1"``, ...

    Raises:
        ConfigurationError: as :func:`~openfl_api.data.label_counts`, or ``class_names`` does not
            have one name per label.
    """
    counts = label_counts(indices, labels, num_classes)
    names = _class_names(class_names, counts.shape[1])
    table = PrettyTable(["client", "size", *names])
    for client, row in enumerate(counts):
        table.add_row([client, int(row.sum()), *row.tolist()])
    table.add_row(["total", int(counts.sum()), *counts.sum(axis=0).tolist()])
    table.align = "r"
    return table.get_string()


def plot_label_distribution(
    indices: Sequence[Any],
    labels: Any,
    path: Union[str, PathLike],
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    *,
    proportions: bool = False,
    title: Optional[str] = None,
    dpi: int = 100,
) -> Path:
    """Writes a PNG of the label distribution per client: one stacked bar per client.

    Each bar stacks the client's samples of each label, one colour per label; the legend is
    drawn for up to 20 labels.

    Args:
        indices: one index array per client, as the partitioners return.
        labels: label of every sample, integers in ``[0, num_classes)``.
        path: where to write the PNG; its folder must exist.
        num_classes: number of labels; defaults to ``max(labels) + 1``.
        class_names: legend entries, one per label; defaults to ``"0"``, ``"1"``, ...
        proportions: draw each client's shares of its samples (bars of height 1) instead of counts.
        title: title of the figure; defaults to a summary of the clients and samples.
        dpi: resolution of the PNG.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ImportError: matplotlib is not installed.
        ConfigurationError: as :func:`label_table`, or the folder of ``path`` does not exist.
    """
    counts = label_counts(indices, labels, num_classes)
    names = _class_names(class_names, counts.shape[1])
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigurationError(f"the folder of path must exist; {str(path.parent)!r} does not (create it first)")
    figure_module = require("matplotlib.figure", "plot", "matplotlib", "plot_label_distribution()")
    agg = require("matplotlib.backends.backend_agg", "plot", "matplotlib", "plot_label_distribution()")
    matplotlib = require("matplotlib", "plot", "matplotlib", "plot_label_distribution()")

    num_clients, num_classes = counts.shape
    heights = counts.astype(float)
    if proportions:
        totals = heights.sum(axis=1, keepdims=True)
        heights = np.divide(heights, totals, out=np.zeros_like(heights), where=totals > 0)
    colours = _colours(matplotlib, num_classes)

    figure = figure_module.Figure(figsize=(min(max(6.0, 2.0 + 0.2 * num_clients), 30.0), 4.5), dpi=dpi)
    agg.FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    clients = np.arange(num_clients)
    bottom = np.zeros(num_clients)
    for label in range(num_classes):
        axes.bar(clients, heights[:, label], bottom=bottom, width=0.85, color=colours[label], label=names[label])
        bottom += heights[:, label]
    axes.set_xlabel("client")
    axes.set_ylabel("share of samples" if proportions else "samples")
    axes.set_xlim(-0.6, num_clients - 0.4)
    if num_clients <= 40:
        axes.set_xticks(clients)
    axes.set_title(title if title is not None else f"{num_clients} clients, {int(counts.sum())} samples")
    if num_classes <= 20:
        axes.legend(title="label", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _class_names(class_names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    if class_names is None:
        return [str(label) for label in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ConfigurationError(
            f"class_names must have one name per label, {num_classes}; got {len(names)} (pass "
            f"num_classes to match, or one name per label)"
        )
    return names


def _colours(matplotlib: Any, num_classes: int) -> List[Any]:
    """Distinct colours for up to 20 labels, then evenly spaced viridis colours."""
    if num_classes <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(num_classes)]
    if num_classes <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(num_classes)]
    return [matplotlib.colormaps["viridis"](x) for x in np.linspace(0.0, 1.0, num_classes)]
