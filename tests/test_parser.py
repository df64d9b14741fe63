"""Tests of openfl_api.parser: options, their two spellings, and defaults from an environment mapping."""

from __future__ import annotations

from typing import List

import pytest

from openfl_api.errors import ConfigurationError
from openfl_api.parser import build_parser, default_init_method, parse_args

LAUNCHER_ENV = {
    "OPENFL_INIT_METHOD": "memory://env",
    "WORLD_SIZE": "5",
    "RANK": "3",
    "LOCAL_RANK": "1",
    "OPENFL_GROUP_NAME": "site-env",
}


def test_defaults_from_an_empty_environment() -> None:
    args = build_parser(environ={}).parse_args([])
    assert vars(args) == {
        "backend": "gloo",
        "init_method": "tcp://localhost:29500",
        "world_size": 2,
        "rank": 0,
        "local_rank": 0,
        "group_name": "openfl_api",
        "address_file": None,
        "resume": None,
    }


def test_defaults_from_the_launcher_environment() -> None:
    args = build_parser(environ=LAUNCHER_ENV).parse_args([])
    assert (args.init_method, args.world_size, args.rank, args.local_rank, args.group_name) == (
        "memory://env", 5, 3, 1, "site-env",
    )


def test_a_given_environ_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("OPENFL_INIT_METHOD", "memory://process")
    args = build_parser(environ={}).parse_args([])
    assert (args.rank, args.init_method) == (0, "tcp://localhost:29500")


def test_without_environ_the_process_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "4")
    assert build_parser().parse_args([]).rank == 4


def test_parse_args_reads_the_process_environment_and_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "6")
    args = parse_args(["--rank", "2"])
    assert (args.world_size, args.rank) == (6, 2)


def test_arguments_win_over_the_environment() -> None:
    args = build_parser(environ=LAUNCHER_ENV).parse_args(
        ["--init_method", "memory://cli", "--world_size", "9", "--rank", "8", "--group_name", "cli"]
    )
    assert (args.init_method, args.world_size, args.rank, args.group_name) == ("memory://cli", 9, 8, "cli")


@pytest.mark.parametrize(
    "option,value,field,expected",
    [
        ("init_method", "memory://x", "init_method", "memory://x"),
        ("world_size", "4", "world_size", 4),
        ("local_rank", "2", "local_rank", 2),
        ("group_name", "site", "group_name", "site"),
        ("address_file", "a.json", "address_file", "a.json"),
    ],
)
@pytest.mark.parametrize("separator", ["_", "-"])
def test_both_spellings_of_an_option(separator: str, option: str, value: str, field: str, expected: object) -> None:
    args = build_parser(environ={}).parse_args([f"--{option.replace('_', separator)}", value])
    assert getattr(args, field) == expected


def test_the_token_is_not_an_option_so_it_never_shows_in_a_process_list() -> None:
    with pytest.raises(SystemExit):
        build_parser(environ={}).parse_args(["--token", "s3cret"])


@pytest.mark.parametrize("argv", [["--rank", "one"], ["--world_size", "2.5"]])
def test_non_integer_arguments_are_refused_by_argparse(argv: List[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(environ={}).parse_args(argv)


@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK", "LOCAL_RANK"])
def test_a_non_integer_environment_variable_is_a_configuration_error(name: str) -> None:
    with pytest.raises(ConfigurationError, match=f"environment variable {name} must be an integer, got 'x'"):
        build_parser(environ={name: "x"})


@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK", "LOCAL_RANK"])
def test_an_empty_integer_environment_variable_means_the_default(name: str) -> None:
    args = build_parser(environ={name: ""}).parse_args([])
    assert (args.world_size, args.rank, args.local_rank) == (2, 0, 0)


def test_scripts_can_extend_the_parser() -> None:
    parser = build_parser(environ={})
    parser.add_argument("--epochs", type=int, default=1)
    assert parser.parse_args(["--epochs", "3", "--rank", "1"]).epochs == 3


# --- default_init_method -----------------------------------------------------------------------


def test_default_init_method_without_environment() -> None:
    assert default_init_method({}) == "tcp://localhost:29500"


def test_default_init_method_prefers_openfl_init_method() -> None:
    environ = {"OPENFL_INIT_METHOD": "file:///tmp/s", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert default_init_method(environ) == "file:///tmp/s"


def test_default_init_method_falls_back_to_master_addr_and_port() -> None:
    assert default_init_method({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}) == "tcp://10.0.0.1:1234"


def test_default_init_method_skips_an_empty_openfl_init_method() -> None:
    assert default_init_method({"OPENFL_INIT_METHOD": "", "MASTER_ADDR": "h"}) == "tcp://h:29500"


def test_default_init_method_with_only_a_port() -> None:
    assert default_init_method({"MASTER_PORT": "29777"}) == "tcp://localhost:29777"


def test_default_init_method_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENFL_INIT_METHOD", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.9.8.7")
    monkeypatch.setenv("MASTER_PORT", "2999")
    assert default_init_method() == "tcp://10.9.8.7:2999"
