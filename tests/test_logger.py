"""Tests of openfl_api.logger: level checks, role and rank on every line, and sinks that do not pile up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
from loguru import logger as loguru_logger

from openfl_api import logger as ofl_logger
from openfl_api.errors import ConfigurationError


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """Read what log_level's sink wrote to (captured) stderr; remove that sink afterwards."""
    previous = ofl_logger._sinks["stderr"]
    yield lambda: capsys.readouterr().err
    sink = ofl_logger._sinks["stderr"]
    if sink is not None and sink != previous:
        loguru_logger.remove(sink)  # it writes to capsys's stream, which closes after the test
    ofl_logger._sinks["stderr"] = None


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """A file sink at DEBUG, removed after the test."""
    path = tmp_path / "rank.log"
    sink = ofl_logger.log_to_file(path)
    yield path
    loguru_logger.remove(sink)


def lines(path: Path) -> List[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("level", ["verbose", "", "INFOS", None, 20])
def test_log_level_rejects_an_unknown_level(level: object) -> None:
    with pytest.raises(ConfigurationError, match="log level must be one of"):
        ofl_logger.log_level(level)  # type: ignore[arg-type]


def test_log_to_file_rejects_an_unknown_level(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="log level must be one of"):
        ofl_logger.log_to_file(tmp_path / "rank.log", level="loud")


def test_a_refused_log_to_file_creates_no_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        ofl_logger.log_to_file(tmp_path / "rank.log", level="loud")
    assert not (tmp_path / "rank.log").exists()


def test_bound_lines_carry_role_and_rank(log_file: Path) -> None:
    ofl_logger.bind("frontend", 3).info("joined")
    assert re.search(r" \| INFO +\| frontend:3 \| [\w.]+:\d+ - joined$", lines(log_file)[-1])


def test_a_role_without_rank_shows_a_dash(log_file: Path) -> None:
    ofl_logger.bind("watcher").warning("file changed")
    assert "| watcher:- |" in lines(log_file)[-1]


def test_the_package_logger_shows_dashes(log_file: Path) -> None:
    ofl_logger.logger.info("plain")
    assert "| -:- |" in lines(log_file)[-1]


def test_unbound_loguru_lines_still_format(log_file: Path) -> None:
    loguru_logger.info("from elsewhere")
    assert "| -:- |" in lines(log_file)[-1]


def test_log_to_file_honours_its_level(tmp_path: Path) -> None:
    path = tmp_path / "rank.log"
    sink = ofl_logger.log_to_file(path, level="warning")
    try:
        ofl_logger.bind("backend", 0).info("hidden")
        ofl_logger.bind("backend", 0).warning("shown")
    finally:
        loguru_logger.remove(sink)
    assert [line.rsplit(" - ", 1)[1] for line in lines(path)] == ["shown"]


def test_log_level_sends_lines_to_stderr_with_role_and_rank(stderr: Callable[[], str]) -> None:
    ofl_logger.log_level("INFO")
    ofl_logger.bind("backend", 0).info("version 3")
    assert re.search(r" \| INFO +\| backend:0 \| [\w.]+:\d+ - version 3$", stderr(), re.MULTILINE)


def test_log_level_filters_below_the_level(stderr: Callable[[], str]) -> None:
    ofl_logger.log_level("warning")
    ofl_logger.bind("backend", 0).info("per transfer")
    assert stderr() == ""


def test_log_level_twice_does_not_duplicate_lines(stderr: Callable[[], str]) -> None:
    ofl_logger.log_level("INFO")
    ofl_logger.log_level("INFO")
    ofl_logger.bind("frontend", 1).info("once")
    assert stderr().count("once") == 1


def test_a_second_log_level_replaces_the_first(stderr: Callable[[], str]) -> None:
    ofl_logger.log_level("DEBUG")
    ofl_logger.log_level("ERROR")
    ofl_logger.bind("frontend", 1).info("dropped")
    assert stderr() == ""


def test_log_level_called_by_many_threads_at_once_leaves_one_stderr_sink(stderr: Callable[[], str]) -> None:
    import threading

    barrier = threading.Barrier(16)

    def set_level() -> None:
        barrier.wait()
        for _ in range(20):
            ofl_logger.log_level("INFO")

    threads = [threading.Thread(target=set_level) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    stderr()
    ofl_logger.bind("backend", 0).info("printed once")
    assert stderr().count("printed once") == 1
