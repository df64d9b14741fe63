"""FedAvg over virtual clients on a real task: digits, 10 clients, three partitions (issue 4).

examples/digits_partitions.py, seeded: each partition runs as one simulated federation (a backend
thread and one frontend thread hosting the 10 clients), 20 versions of 5 local epochs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn: pip install openfl_api[digits]")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import digits_partitions  # noqa: E402


@pytest.fixture(scope="module")
def accuracy():
    return {partition: digits_partitions.run(partition) for partition in digits_partitions.PARTITIONS}


def test_every_partition_reports_the_accuracy_of_every_version(accuracy):
    assert all(len(values) == 20 for values in accuracy.values())


def test_fedavg_on_iid_digits_reaches_95_percent(accuracy):
    assert accuracy["iid"][-1] >= 0.95, accuracy["iid"][-1]


def test_label_skew_costs_accuracy_at_equal_versions(accuracy):
    final = {partition: values[-1] for partition, values in accuracy.items()}
    assert final["iid"] >= final["dirichlet"] >= final["labels"], final
