"""Data for federated experiments: partitioners, reports, and datasets that need no download.

The partitioners are pure numpy functions in :mod:`openfl_api.data.functional`; each returns one
sorted ``int64`` index array per client, covering the dataset exactly once, from an explicit
``seed``. :class:`Partition` wraps such a list to check it, report it and cut a dataset with it.
matplotlib (plots) and scikit-learn (digits) are optional extras, imported on first use.
"""

from __future__ import annotations

from openfl_api.data.datasets import TrainTest, load_digits, synthetic, synthetic_iid
from openfl_api.data.functional import (
    Seed,
    dirichlet,
    iid,
    label_counts,
    lognormal_quantity,
    powerlaw_quantity,
    shards,
    stratified_split,
)
from openfl_api.data.partition import Partition
from openfl_api.data.report import label_table, plot_label_distribution

__all__ = [
    "Partition",
    "Seed",
    "iid",
    "dirichlet",
    "shards",
    "lognormal_quantity",
    "powerlaw_quantity",
    "stratified_split",
    "label_counts",
    "label_table",
    "plot_label_distribution",
    "TrainTest",
    "load_digits",
    "synthetic",
    "synthetic_iid",
]
