"""The protected wire with real processes started by the launcher: a tampered upload, an upload
sealed with another key and a replayed upload are each refused and counted, and the final model
is the one of the same federation without them, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_federation import SCRIPT, Processes, launch

ARGS = ("--count", "2", "--max_version", "3", "--protect_wire")


def run(processes: Processes, tmp_path: Path, *extra: str) -> dict:
    result = tmp_path / "result"
    done = launch(processes, tmp_path, 3, SCRIPT, *ARGS, "--result", str(result), *extra, OPENFL_API_TOKEN="t")
    assert done.returncode == 0, done.stdout[-3000:]
    return {rank: json.loads(Path(f"{result}.{rank}").read_text()) for rank in range(3)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final model of the federation without an attack."""
    processes = Processes()
    try:
        return run(processes, tmp_path_factory.mktemp("reference"))[0]
    finally:
        processes.reap()


@pytest.fixture
def processes():
    group = Processes()
    yield group
    group.reap()


@pytest.mark.parametrize("attack,reason", [("tamper", "failed authentication"), ("wrong_key", "failed authentication"),
                                           ("replay", "replayed")])
def test_a_bad_message_on_the_protected_wire_is_refused_counted_and_leaves_the_model_unchanged(
        processes, tmp_path, reference, attack, reason):
    results = run(processes, tmp_path, "--wire_attack", attack)
    backend = results[0]
    assert results[2]["closed by the backend"] is True
    assert backend["wire"] == {reason: 1}
    assert (backend["weight"], backend["bias"], backend["version"]) == \
        (reference["weight"], reference["bias"], reference["version"])
    assert reference["wire"] == {}
    log = (tmp_path / "logs" / "rank_0.log").read_text()
    assert f"left: refused on the wire" in log and "wire aes-256-gcm" in log
