"""Tests of openfl_api.address: fields and their fallbacks, validation, address files, the watcher."""

from __future__ import annotations

import argparse
import json
import os
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from openfl_api.address import SCHEMA_VERSION, Address, AddressFileWatcher, dump_address_file, load_address_file
from openfl_api.errors import AddressError

ENV = ("RANK", "WORLD_SIZE", "OPENFL_INIT_METHOD", "MASTER_ADDR", "MASTER_PORT", "OPENFL_GROUP_NAME")
WAIT = 5.0  # seconds any test waits for the watcher thread


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from an environment without the launcher's variables."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def namespace(**fields: Any) -> argparse.Namespace:
    """A namespace like the parser's, with every field unset unless given."""
    values = dict.fromkeys(("backend", "init_method", "world_size", "rank", "group_name"))
    values.update(fields)
    return argparse.Namespace(**values)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with a new file, so the watcher always sees a new inode."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def document(*entries: Any, schema: Any = SCHEMA_VERSION) -> str:
    return json.dumps({"schema": schema, "addresses": list(entries)})


A = {"init_method": "tcp://127.0.0.1:29600", "world_size": 3, "group_name": "site-a"}
B = {"init_method": "file:///tmp/site-b.store", "world_size": 5, "group_name": "site-b"}
C = {"init_method": "memory://site-c", "world_size": 2}


# --- fields and fallbacks ----------------------------------------------------------------------


def test_defaults_without_environment() -> None:
    address = Address()
    assert address.to_dict() == {
        "backend": "gloo",
        "init_method": "tcp://localhost:29500",
        "world_size": 2,
        "rank": 0,
        "group_name": "openfl_api",
    }


def test_explicit_fields() -> None:
    address = Address("gloo", "memory://fed", 4, 3, "site")
    assert address.to_dict() == {
        "backend": "gloo", "init_method": "memory://fed", "world_size": 4, "rank": 3, "group_name": "site",
    }


def test_fields_come_from_an_args_namespace() -> None:
    args = namespace(init_method="memory://from-args", world_size=6, rank=5, group_name="args")
    assert Address(args=args).to_dict() == {
        "backend": "gloo", "init_method": "memory://from-args", "world_size": 6, "rank": 5, "group_name": "args",
    }


def test_fields_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENFL_INIT_METHOD", "memory://from-env")
    monkeypatch.setenv("WORLD_SIZE", "7")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("OPENFL_GROUP_NAME", "env")
    assert Address().to_dict() == {
        "backend": "gloo", "init_method": "memory://from-env", "world_size": 7, "rank": 6, "group_name": "env",
    }


def test_init_method_falls_back_to_master_addr_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29777")
    assert Address().init_method == "tcp://10.1.2.3:29777"


def test_openfl_init_method_wins_over_master_addr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29777")
    monkeypatch.setenv("OPENFL_INIT_METHOD", "memory://wins")
    assert Address().init_method == "memory://wins"


@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK", "OPENFL_GROUP_NAME", "OPENFL_INIT_METHOD"])
def test_an_empty_environment_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "")
    assert Address() == Address("gloo", "tcp://localhost:29500", 2, 0, "openfl_api")


@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK"])
def test_a_non_integer_environment_variable_is_an_address_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "two")
    with pytest.raises(AddressError, match=f"environment variable {name} must be an integer, got 'two'"):
        Address()


def test_args_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENFL_INIT_METHOD", "memory://env")
    monkeypatch.setenv("WORLD_SIZE", "7")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("OPENFL_GROUP_NAME", "env")
    args = namespace(init_method="memory://args", world_size=4, rank=3, group_name="args")
    assert Address(args=args) == Address("gloo", "memory://args", 4, 3, "args")


def test_explicit_fields_win_over_args_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENFL_INIT_METHOD", "memory://env")
    monkeypatch.setenv("WORLD_SIZE", "7")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("OPENFL_GROUP_NAME", "env")
    args = namespace(init_method="memory://args", world_size=4, rank=3, group_name="args")
    address = Address(init_method="memory://explicit", world_size=3, rank=2, group_name="explicit", args=args)
    assert address == Address("gloo", "memory://explicit", 3, 2, "explicit")


def test_unset_args_fields_fall_through_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "9")
    monkeypatch.setenv("RANK", "4")
    address = Address(args=namespace(init_method="memory://args"))
    assert (address.init_method, address.world_size, address.rank) == ("memory://args", 9, 4)


def test_explicit_zero_rank_is_not_mistaken_for_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert Address(rank=0, args=namespace(rank=1)).rank == 0


# --- validation --------------------------------------------------------------------------------


def test_backend_must_be_gloo() -> None:
    with pytest.raises(AddressError, match="field 'backend' must be 'gloo', got 'nccl'"):
        Address(backend="nccl", init_method="memory://x")


@pytest.mark.parametrize("world_size", [1, 0, -3, True, 2.0, "2"])
def test_world_size_must_be_an_integer_of_at_least_2(world_size: Any) -> None:
    with pytest.raises(AddressError, match="field 'world_size' must be an integer >= 2"):
        Address(init_method="memory://x", world_size=world_size)


@pytest.mark.parametrize("rank", [3, 4, -1, True, 1.0])
def test_rank_must_be_in_range(rank: Any) -> None:
    with pytest.raises(AddressError, match=r"field 'rank' must be an integer in \[0, 3\)"):
        Address(init_method="memory://x", world_size=3, rank=rank)


@pytest.mark.parametrize("group_name", ["", "has space", "a/b", "x" * 65, "é", 5])
def test_group_name_must_be_letters_digits_and_punctuation(group_name: Any) -> None:
    with pytest.raises(AddressError, match="field 'group_name' must be 1-64 characters"):
        Address(init_method="memory://x", group_name=group_name)


def test_group_name_of_64_characters_is_accepted() -> None:
    assert Address(init_method="memory://x", group_name="x" * 64).group_name == "x" * 64


@pytest.mark.parametrize("init_method", ["tcp://localhost", "tcp://localhost:", "tcp://:29500"])
def test_tcp_needs_a_host_and_a_port(init_method: str) -> None:
    with pytest.raises(AddressError, match="field 'init_method' must look like tcp://host:port"):
        Address(init_method=init_method)


@pytest.mark.parametrize("port", ["70000", "0", "65536", "port"])
def test_tcp_port_must_be_in_range(port: str) -> None:
    with pytest.raises(AddressError, match="with a port in 1..65535"):
        Address(init_method=f"tcp://localhost:{port}")


@pytest.mark.parametrize("init_method", ["file://relative/store", "file:relative/store", "file:///tmp/folder/"])
def test_file_needs_an_absolute_path_to_a_file(init_method: str) -> None:
    with pytest.raises(AddressError, match="field 'init_method' must look like file:///absolute/path/to/store"):
        Address(init_method=init_method)


@pytest.mark.parametrize("init_method", ["http://localhost:80", "env://", "localhost:29500", ""])
def test_unknown_scheme_is_refused(init_method: str) -> None:
    with pytest.raises(AddressError, match="field 'init_method' must start with tcp://, file:// or memory://"):
        Address(init_method=init_method)


@pytest.mark.parametrize("init_method", ["memory://", "memory://a b", "memory://name/path"])
def test_memory_needs_a_name(init_method: str) -> None:
    with pytest.raises(AddressError, match="field 'init_method' must look like memory://name"):
        Address(init_method=init_method)


def test_init_method_must_be_a_string() -> None:
    with pytest.raises(AddressError, match="field 'init_method' must be a string, got int"):
        Address(init_method=29500)


# --- properties --------------------------------------------------------------------------------


def test_tcp_properties() -> None:
    address = Address(init_method="tcp://10.0.0.5:29600", group_name="g")
    assert (address.scheme, address.host, address.port, address.path, address.key) == (
        "tcp", "10.0.0.5", 29600, None, ("tcp://10.0.0.5:29600", "g"),
    )


def test_file_properties() -> None:
    address = Address(init_method="file:///tmp/fed.store")
    assert (address.scheme, address.host, address.port, address.path) == ("file", None, None, "/tmp/fed.store")


def test_memory_properties() -> None:
    address = Address(init_method="memory://fed")
    assert (address.scheme, address.host, address.port, address.path) == ("memory", None, None, None)


def test_key_ignores_rank_and_world_size() -> None:
    assert Address("gloo", "memory://m", 3, 1, "g").key == Address("gloo", "memory://m", 5, 4, "g").key


def test_replace_changes_a_field() -> None:
    assert Address(init_method="memory://m", world_size=3).replace(rank=2) == Address("gloo", "memory://m", 3, 2, "openfl_api")


def test_replace_validates_again() -> None:
    with pytest.raises(AddressError, match="field 'rank' must be an integer in"):
        Address(init_method="memory://m", world_size=3).replace(rank=3)


def test_equal_addresses_hash_equal() -> None:
    assert {Address(init_method="memory://m"), Address(init_method="memory://m")} == {Address(init_method="memory://m")}


# --- address files -----------------------------------------------------------------------------


def test_load_a_valid_address_file(tmp_path: Path) -> None:
    path = tmp_path / "addresses.json"
    path.write_text(document(A, B, C))
    assert load_address_file(path) == [
        Address("gloo", "tcp://127.0.0.1:29600", 3, 0, "site-a"),
        Address("gloo", "file:///tmp/site-b.store", 5, 0, "site-b"),
        Address("gloo", "memory://site-c", 2, 0, "openfl_api"),
    ]


def test_one_store_may_serve_two_groups(tmp_path: Path) -> None:
    path = tmp_path / "addresses.json"
    path.write_text(document(A, dict(A, group_name="site-z")))
    assert [a.group_name for a in load_address_file(path)] == ["site-a", "site-z"]


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    addresses = [Address("gloo", "tcp://127.0.0.1:29600", 3, 1, "site-a"), Address("gloo", "memory://m", 4, 0, "b")]
    path = tmp_path / "addresses.json"
    dump_address_file(path, addresses)
    assert load_address_file(path) == addresses


def test_dump_writes_the_documented_layout(tmp_path: Path) -> None:
    path = tmp_path / "addresses.json"
    dump_address_file(path, [Address("gloo", "memory://m", 4, 0, "b")])
    assert json.loads(path.read_text()) == {
        "schema": 1,
        "addresses": [{"backend": "gloo", "init_method": "memory://m", "world_size": 4, "rank": 0, "group_name": "b"}],
    }


def test_dump_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "addresses.json"
    dump_address_file(path, [Address(init_method="memory://m")])
    dump_address_file(path, [Address(init_method="memory://n")])
    assert [p.name for p in tmp_path.iterdir()] == ["addresses.json"]


def test_a_failed_dump_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "addresses.json"
    dump_address_file(path, [Address(init_method="memory://m")])
    before = path.read_text()
    broken = Address(init_method="memory://n")
    broken.group_name = object()  # not JSON-serialisable: the write fails half-way
    with pytest.raises(TypeError):
        dump_address_file(path, [broken])
    assert ([p.name for p in tmp_path.iterdir()], path.read_text()) == (["addresses.json"], before)


def test_a_missing_address_file_is_an_address_error(tmp_path: Path) -> None:
    with pytest.raises(AddressError, match="addresses.json: cannot be read"):
        load_address_file(tmp_path / "addresses.json")


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        (json.dumps([A]), r"must be a JSON object with exactly the keys 'schema' and 'addresses', got list"),
        (json.dumps({"addresses": [A]}), r"exactly the keys 'schema' and 'addresses', got \['addresses'\]"),
        (json.dumps({"schema": 1, "addresses": [], "x": 1}), r"got \['addresses', 'schema', 'x'\]"),
        (document(A, schema=2), "schema 2 is not supported; use 1"),
        (document(A, schema="1"), "schema '1' is not supported; use 1"),
        (json.dumps({"schema": 1, "addresses": A}), "'addresses' must be a list, got dict"),
    ],
    ids=["not-json", "empty", "list", "missing-schema", "extra-key", "schema-2", "schema-str", "addresses-object"],
)
def test_a_malformed_address_file_is_refused(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "addresses.json"
    path.write_text(text)
    with pytest.raises(AddressError, match=match):
        load_address_file(path)


@pytest.mark.parametrize(
    "entries,match",
    [
        ([A, "tcp://127.0.0.1:29601"], "entry 1: must be a JSON object, got str"),
        ([A, dict(B, port=29600)], r"entry 1: unknown field 'port'; allowed fields are"),
        ([A, {"world_size": 3}], "entry 1: field 'init_method' is required"),
        ([{"init_method": "memory://m"}], "entry 0: field 'world_size' is required"),
        ([A, B, dict(A, world_size=9)], "entry 2: repeats init_method 'tcp://127.0.0.1:29600' with group_name 'site-a' of entry 0"),
        ([A, dict(B, world_size=1)], r"entry 1 \(group 'site-b'\): field 'world_size' must be an integer >= 2"),
        ([dict(A, rank=3)], r"entry 0 \(group 'site-a'\): field 'rank' must be an integer in \[0, 3\)"),
        ([A, dict(B, init_method="file://relative")], r"entry 1 \(group 'site-b'\): field 'init_method' must look like file:///"),
        ([dict(A, backend="nccl")], r"entry 0 \(group 'site-a'\): field 'backend' must be 'gloo'"),
        ([dict(A, group_name="a b")], r"entry 0 \(group 'a b'\): field 'group_name' must be 1-64 characters"),
    ],
    ids=["not-object", "unknown-field", "no-init-method", "no-world-size", "duplicate", "world-size", "rank",
         "init-method", "backend", "group-name"],
)
def test_an_invalid_entry_is_refused_naming_its_index_and_field(tmp_path: Path, entries: List[Any], match: str) -> None:
    path = tmp_path / "addresses.json"
    path.write_text(document(*entries))
    with pytest.raises(AddressError, match=match):
        load_address_file(path)


# --- the watcher -------------------------------------------------------------------------------


class Recorder:
    """An on_change callback that records every call and sets an event."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self.called = threading.Event()

    def __call__(self, added: List[Address], removed: List[Address], changed: list) -> None:
        self.calls.append((added, removed, changed))
        self.called.set()


def address(entry: dict) -> Address:
    return Address(**entry)


@pytest.fixture
def watched(tmp_path: Path) -> Tuple[Path, AddressFileWatcher, Recorder]:
    """An address file holding A and B, and a watcher that has read it."""
    path = tmp_path / "addresses.json"
    write_atomically(path, document(A, B))
    recorder = Recorder()
    watcher = AddressFileWatcher(path, recorder, interval=timedelta(milliseconds=10))
    watcher.load()
    yield path, watcher, recorder
    watcher.stop()


def test_load_returns_the_addresses_of_the_file(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    _, watcher, _ = watched
    assert watcher.load() == [address(A), address(B)]


def test_poll_of_an_unchanged_file_reports_nothing(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    _, watcher, recorder = watched
    watcher.poll()
    assert recorder.calls == []


def test_poll_reports_an_added_entry(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    path, watcher, recorder = watched
    write_atomically(path, document(A, B, C))
    watcher.poll()
    assert recorder.calls == [([address(C)], [], [])]


def test_poll_reports_a_removed_entry(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    path, watcher, recorder = watched
    write_atomically(path, document(B))
    watcher.poll()
    assert recorder.calls == [([], [address(A)], [])]


def test_poll_reports_a_changed_entry_as_changed_with_its_old_and_new_fields(
        watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    path, watcher, recorder = watched
    write_atomically(path, document(A, dict(B, world_size=9)))
    watcher.poll()
    assert recorder.calls == [([], [], [(address(B), address(dict(B, world_size=9)))])]


def test_poll_of_a_rewrite_with_the_same_entries_reports_nothing(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    path, watcher, recorder = watched
    write_atomically(path, document(B, A))
    watcher.poll()
    assert recorder.calls == []


@pytest.mark.parametrize("text", ["{half-written", document(A, dict(B, world_size=1)), ""], ids=["not-json", "bad-entry", "empty"])
def test_poll_ignores_an_invalid_rewrite(watched: Tuple[Path, AddressFileWatcher, Recorder], text: str) -> None:
    path, watcher, recorder = watched
    write_atomically(path, text)
    watcher.poll()
    assert recorder.calls == []


def test_poll_ignores_a_deleted_file(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    path, watcher, recorder = watched
    path.unlink()
    watcher.poll()
    assert recorder.calls == []


def test_an_invalid_rewrite_keeps_the_previous_set(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    path, watcher, recorder = watched
    write_atomically(path, "{half-written")
    watcher.poll()
    write_atomically(path, document(A, B))  # the same set as before the invalid rewrite: no change
    watcher.poll()
    assert recorder.calls == []


def test_a_valid_rewrite_after_an_invalid_one_is_reported(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    path, watcher, recorder = watched
    write_atomically(path, "{half-written")
    watcher.poll()
    write_atomically(path, document(B, C))
    watcher.poll()
    assert recorder.calls == [([address(C)], [address(A)], [])]


def test_poll_without_load_reports_every_entry_as_added(tmp_path: Path) -> None:
    path = tmp_path / "addresses.json"
    write_atomically(path, document(A, B))
    recorder = Recorder()
    AddressFileWatcher(path, recorder).poll()
    assert recorder.calls == [([address(A), address(B)], [], [])]


def test_watcher_thread_reports_an_added_entry(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    path, watcher, recorder = watched
    watcher.start()
    dump_address_file(path, [address(A), address(B), address(C)])
    assert recorder.called.wait(WAIT), f"the watcher reported nothing within {WAIT} s"
    assert recorder.calls == [([address(C)], [], [])]


def test_watcher_thread_outlives_a_failing_callback(tmp_path: Path) -> None:
    path = tmp_path / "addresses.json"
    write_atomically(path, document(A))
    calls: List[Tuple[List[Address], List[Address]]] = []
    first, second = threading.Event(), threading.Event()

    def on_change(added: List[Address], removed: List[Address], changed: list) -> None:
        calls.append((added, removed))
        if not first.is_set():
            first.set()
            raise RuntimeError("callback failed")
        second.set()

    watcher = AddressFileWatcher(path, on_change, interval=timedelta(milliseconds=10))
    watcher.load()
    watcher.start()
    try:
        write_atomically(path, document(A, B))
        # The second rewrite waits for the first report, or one poll could see both.
        assert first.wait(WAIT), f"the watcher reported nothing within {WAIT} s"
        write_atomically(path, document(A, B, C))
        assert second.wait(WAIT), "the watcher stopped after its callback raised"
    finally:
        watcher.stop()
    assert calls == [([address(B)], []), ([address(C)], [])]


def test_stop_ends_the_watcher_thread(watched: Tuple[Path, AddressFileWatcher, Recorder]) -> None:
    _, watcher, _ = watched
    before = set(threading.enumerate())
    watcher.start()
    started = set(threading.enumerate()) - before
    watcher.stop()
    assert [t.name for t in started] == ["openfl-address-watcher"] and not any(t.is_alive() for t in started)
