"""The record of a run: its lines, a resume that cuts it back to the checkpoint, reading it back,
TensorBoard, the progress line and the report table. Federations run in this process over memory://."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import openfl_api as ofl
from openfl_api.errors import ConfigurationError, RoleError
from openfl_api.metrics import MetricRules, weighted_mean
from openfl_api.parser import environment
from openfl_api.progress import Progress
from openfl_api.record import Record, RecordError, read_record
from openfl_api.sinks import scalars
from recorded import federation, loop


def by_event(entries, event):
    return [e for e in entries if e["event"] == event]


@pytest.fixture
def log_lines():
    from loguru import logger

    lines = []
    sink = logger.add(lambda message: lines.append(str(message).rstrip("\n")), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def test_a_recorded_run_has_one_line_per_event_with_versions_uploads_and_evaluations(tmp_path):
    path = tmp_path / "run.jsonl"
    federation(record=str(path), steps=[ofl.FederatedEvaluation(every=1)])
    entries = read_record(path)
    assert all(e["schema"] == 1 and isinstance(e["time"], float) for e in entries)
    assert [e["elapsed"] for e in entries] == sorted(e["elapsed"] for e in entries)
    assert entries[0]["event"] == "run" and entries[0]["max_version"] == 3 and entries[0]["synchronous"] is True
    assert entries[-1] == {**entries[-1], "event": "end", "version": 3, "reason": "version 3 reached max_version=3"}
    assert sorted(e["rank"] for e in by_event(entries, "join")) == [1, 2]
    versions = by_event(entries, "version")
    assert [v["version"] for v in versions] == [1, 2, 3]
    uploads = by_event(entries, "upload")
    for version in versions:
        mine = [u for u in uploads if u["accepted"] and u["trained_from"] == version["version"] - 1]
        assert version["uploads"] == 2 and version["participants"] == ["test/rank1", "test/rank2"]
        assert version["num_samples"] == 4 + 8 and version["staleness"] == {"mean": 0.0, "max": 0}
        assert version["bytes_in"] == sum(u["bytes"] for u in mine) + sum(
            r["bytes"] for r in by_event(entries, "report") if r["version"] == version["version"] - 1)
        assert version["bytes_out"] > 0
        timing = version["timing"]
        assert timing["waiting"] + timing["receiving"] + timing["aggregating"] == pytest.approx(timing["round"])
        losses = sorted(mine, key=lambda u: u["client"])
        assert version["metrics"]["loss"] == {
            "mean": weighted_mean([u["metrics"]["loss"] for u in losses], [u["num_samples"] for u in losses]),
            "min": min(u["metrics"]["loss"] for u in losses), "max": max(u["metrics"]["loss"] for u in losses)}
    evaluations = by_event(entries, "evaluation")
    assert [(e["kind"], e["version"], e["clients"], e["num_samples"]) for e in evaluations] == [
        ("federated", v, 2, 30) for v in range(4)]
    for evaluation in evaluations:
        reports = [r for r in by_event(entries, "report") if r["version"] == evaluation["version"]]
        assert evaluation["metrics"]["accuracy"]["mean"] == weighted_mean(
            [r["metrics"]["accuracy"] for r in reports], [r["num_samples"] for r in reports])


def test_a_resumed_backend_cuts_the_record_back_to_its_checkpoint_and_appends_without_duplicates(tmp_path):
    path, checkpoint = tmp_path / "run.jsonl", str(tmp_path / "ckpt")
    federation(record=str(path), versions=2, checkpoint=checkpoint)
    first = read_record(path)
    # What a backend killed after its last checkpoint leaves: lines of versions it did not save, and a cut line.
    with open(path, "a") as record:
        record.write(json.dumps({**by_event(first, "version")[-1], "version": 3}) + "\n" + '{"schema": 1, "ev')
    fed = federation(record=str(path), versions=4, checkpoint=checkpoint, resume=checkpoint)
    entries = read_record(path)
    assert path.read_text().endswith("\n")
    assert [e["version"] for e in by_event(entries, "version")] == [1, 2, 3, 4]
    assert [e["event"] for e in entries].count("run") == 1 and [e["event"] for e in entries].count("end") == 1
    resume = by_event(entries, "resume")
    assert len(resume) == 1 and resume[0]["version"] == 2 and resume[0]["checkpoint"].endswith("ckpt.2")
    assert entries.index(resume[0]) == first.index(by_event(first, "version")[-1]) + 1
    assert sorted(fed.backend.history.versions) == [1, 2, 3, 4]


def test_a_run_that_is_not_resumed_starts_its_record_afresh(tmp_path, log_lines):
    path = tmp_path / "run.jsonl"
    path.write_text("an earlier record\n")
    federation(record=str(path), versions=1)
    assert [e["event"] for e in read_record(path)][0] == "run"
    assert f"recording to {path} (replacing an earlier record)" in log_lines


def test_reading_a_record_leaves_out_a_line_cut_short_and_names_a_bad_line(tmp_path):
    path = tmp_path / "run.jsonl"
    good = json.dumps({"schema": 1, "event": "run", "version": 0})
    path.write_text(good + "\n" + '{"schema": 1, "event": "ver')
    assert read_record(path) == [json.loads(good)]
    path.write_text(good + "\nnot json\n" + good + "\n")
    with pytest.raises(RecordError, match=r"run.jsonl:2 is not a record entry \(a JSON object with an 'event'\)"):
        read_record(path)
    path.write_text(json.dumps({"schema": 7, "event": "run"}) + "\n")
    with pytest.raises(RecordError, match="run.jsonl:1 has schema 7; this openfl_api reads schema 1"):
        read_record(path)
    with pytest.raises(RecordError, match="cannot read the record .*missing.jsonl"):
        read_record(tmp_path / "missing.jsonl")


def test_tensorboards_own_reader_reads_back_the_scalars_the_record_holds(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    path, board = tmp_path / "run.jsonl", tmp_path / "tb"
    fed = federation(record=Record(path=path, tensorboard=board), steps=[
        ofl.FederatedEvaluation(every=2), ofl.CentralizedEvaluation(lambda: {"weight": 1.0})])
    del fed
    want = {}
    for entry in read_record(path):
        for tag, value in scalars(entry):
            want.setdefault(tag, {})[entry["version"]] = value
    assert {"train/loss", "train/loss/min", "federated/accuracy", "centralized/weight", "timing/round",
            "timing/receiving", "bytes/in", "uploads"} <= set(want)
    reader = event_accumulator.EventAccumulator(str(board), size_guidance={"scalars": 0})
    reader.Reload()
    assert sorted(reader.Tags()["scalars"]) == sorted(want)
    for tag, points in want.items():
        got = {event.step: event.value for event in reader.Scalars(tag)}
        assert got == pytest.approx(points, rel=1e-6), tag


def test_the_progress_line_is_quiet_when_its_output_is_not_a_terminal(tmp_path):
    assert Progress.open(None, total=3, initial=0, log=None) is None  # pytest's stderr is no terminal
    assert Progress.open(False, total=3, initial=0, log=None) is None


def test_the_progress_line_shows_the_version_of_n_and_the_last_metrics_on_the_launchers_descriptor(tmp_path):
    pytest.importorskip("tqdm")
    read, write = os.pipe()
    try:
        with environment({"OPENFL_PROGRESS_FD": str(write)}):
            federation(record=Record(progress=True), steps=[ofl.FederatedEvaluation(every=1)])
        os.close(write)
        write = -1
        text = os.read(read, 1 << 16).decode()
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("version: 100%|") and "| 3/3 [" in last and " versions/s" in last, last
    assert "loss -3.366, federated accuracy -1.699" in last, last


def test_the_report_table_gains_the_time_split_and_metrics_per_version(tmp_path):
    fed = federation(steps=[ofl.CentralizedEvaluation(lambda: {"weight": 2.5})])
    report = fed.backend.report()
    assert "Peer" in report.splitlines()[1]  # the transfer table stays first
    for column in ("| version |", "round s", "waiting s", "receiving s", "aggregating s", "train loss",
                   "centralized weight"):
        assert column in report
    assert fed.backend.history.metrics("centralized", 3) == {"weight": {"mean": 2.5}}


def test_record_false_keeps_nothing(tmp_path):
    fed = federation(record=False)
    assert fed.backend.history is None and "| version |" not in fed.backend.report()
    fed.backend.log_metrics("centralized", {"x": 1.0})  # accepted and dropped


def test_the_record_path_comes_from_the_launchers_variable_when_the_script_gives_none(tmp_path):
    path = tmp_path / "from_env.jsonl"
    with environment({"OPENFL_RECORD": str(path)}):
        federation(versions=1)
    assert by_event(read_record(path), "version")[0]["version"] == 1


def test_custom_statistics_reach_the_record(tmp_path):
    def spread(values, weights):
        return max(values) - min(values)

    path = tmp_path / "run.jsonl"
    federation(record=Record(path=path, metrics=MetricRules(loss=("mean", spread))), versions=1)
    assert set(by_event(read_record(path), "version")[0]["metrics"]["loss"]) == {"mean", "spread"}


@pytest.mark.parametrize("record,match", [
    (3, "API\\(record=...\\) must be a path, an openfl_api.Record, None or False, got int"),
    (Record, "API\\(record=...\\) must be a path, an openfl_api.Record, None or False, got type"),
])
def test_a_record_argument_of_the_wrong_kind_is_refused(record, match):
    with pytest.raises(ConfigurationError, match=match):
        ofl.API(frontend=False, record=record)


@pytest.mark.parametrize("kwargs,match", [
    ({"path": ""}, "Record\\(path=...\\) must be a non-empty path or None"),
    ({"tensorboard": 3}, "Record\\(tensorboard=...\\) must be a non-empty path or None"),
    ({"progress": "yes"}, "Record\\(progress=...\\) must be True, False or None"),
    ({"metrics": {"loss": "mean"}}, "Record\\(metrics=...\\) must be an openfl_api.metrics.MetricRules"),
])
def test_record_options_are_checked_when_built(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        Record(**kwargs)


def test_a_record_in_a_folder_that_does_not_exist_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigurationError, match="the record's folder .*nowhere does not exist; create it"):
        ofl.API(frontend=False, record=str(tmp_path / "nowhere" / "run.jsonl"))


@pytest.mark.parametrize("args,match", [
    (("train", {"x": 1.0}), "log_metrics\\(kind=...\\) must be an identifier such as 'centralized' \\(not 'train'"),
    (("my kind", {"x": 1.0}), "must be an identifier"),
    (("test", {"x": float("nan")}), "metric 'x' must be a finite number"),
    (("test", {"x": 1.0}, -1), "log_metrics\\(version=...\\) must be an integer >= 0"),
])
def test_log_metrics_checks_its_arguments(args, match):
    fed = federation(versions=1)
    kind, metrics, *version = args
    with pytest.raises(ConfigurationError, match=match):
        fed.backend.log_metrics(kind, metrics, version=version[0] if version else None)


def test_log_metrics_belongs_to_the_backend():
    with pytest.raises(RoleError, match="log_metrics\\(\\) belongs to the backend"):
        ofl.API(frontend=True).log_metrics("test", {"x": 1.0})


def test_a_frontend_that_evaluates_the_final_model_without_api_evaluate_still_ends(tmp_path):
    path = tmp_path / "run.jsonl"
    fed = federation(record=str(path), steps=[ofl.FederatedEvaluation()], body=loop(evaluate=False))
    assert [r["reason"] for r in fed.results.values()] == ["version 3 reached max_version=3"] * 2
    assert not by_event(read_record(path), "evaluation")
    assert Path(path).read_text().count('"event":"version"') == 3


def test_the_launcher_and_simulate_hand_the_record_to_the_backend(tmp_path):
    from openfl_api.launch.config import parse_args
    from openfl_api.simulate import simulate

    script = tmp_path / "script.py"
    script.write_text("")
    config = parse_args(["--nproc_per_node", "2", "--record", str(tmp_path / "run.jsonl"), "--tensorboard",
                         str(tmp_path / "tb"), str(script)])
    assert (config.record, config.tensorboard) == (tmp_path / "run.jsonl", tmp_path / "tb")
    with pytest.raises(SystemExit):
        parse_args(["--nproc_per_node", "2", "--record", str(tmp_path / "nowhere" / "run.jsonl"), str(script)])

    def rank():
        api = ofl.API(frontend=False)
        return api._record.path, api._record.tensorboard

    assert simulate(rank, nproc_per_node=2, record=tmp_path / "run.jsonl")[0] == (str(tmp_path / "run.jsonl"), None)
    with pytest.raises(ConfigurationError, match="simulate\\(record=...\\) must be a non-empty path or None"):
        simulate(rank, nproc_per_node=2, record="")


def test_an_asynchronous_federation_evaluates_and_records_too(tmp_path):
    path = tmp_path / "run.jsonl"
    fed = federation(record=str(path), versions=4, asynchronous=ofl.Asynchronous(alpha=0.5, min_frontends=2),
                     steps=[ofl.FederatedEvaluation(every=2)])
    entries = read_record(path)
    assert entries[0]["synchronous"] is False
    assert [e["version"] for e in by_event(entries, "version")] == [1, 2, 3, 4]
    evaluated = [e["version"] for e in by_event(entries, "evaluation")]
    # asynchronous frontends may report an older version's evaluation after a newer one's; each
    # version is recorded once, and the final model's evaluation comes last
    assert evaluated[-1] == 4 and len(evaluated) == len(set(evaluated))
    assert {r["reason"] for r in fed.results.values()} == {"version 4 reached max_version=4"}


def test_a_sink_whose_package_is_missing_is_refused_when_the_api_is_built(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "tqdm")
                        else real(name, *a))
    with pytest.raises(ConfigurationError, match="recording to TensorBoard needs the tensorboard package: "
                                                 "pip install 'openfl_api\\[tensorboard\\]'"):
        ofl.API(frontend=False, record=Record(tensorboard="tb"))
    with pytest.raises(ConfigurationError, match="Record\\(progress=True\\) needs the tqdm package: "
                                                 "pip install 'openfl_api\\[progress\\]'"):
        ofl.API(frontend=False, record=Record(progress=True))


def test_only_the_backend_checks_where_the_record_goes(tmp_path):
    nowhere = str(tmp_path / "nowhere" / "run.jsonl")
    ofl.API(frontend=True, record=nowhere)  # a frontend on another machine records nothing
    undecided = ofl.API(record=nowhere)
    with pytest.raises(ConfigurationError, match="the record's folder .*nowhere does not exist"):
        undecided.build_connection(address=ofl.Address(init_method="memory://nowhere-check", world_size=2, rank=0))


def test_a_resumed_record_takes_a_report_of_a_version_evaluated_before_its_checkpoint_as_late(tmp_path):
    """What a frontend joining a resumed backend again sends (its last report once more) is not counted twice."""
    from types import SimpleNamespace

    from openfl_api import checkpoint as checkpoints
    from openfl_api.logger import bind
    from openfl_api.record import Recorder
    from openfl_api.step import Transfer
    from openfl_api.timing import RoundClock

    path, prefix = tmp_path / "run.jsonl", str(tmp_path / "ckpt")
    federation(record=str(path), versions=2, checkpoint=prefix, steps=[ofl.FederatedEvaluation(every=1, final=False)])
    source, data = checkpoints.newest(prefix, bind("backend"))
    assert source.endswith("ckpt.2")
    recorder = Recorder(Record(path=path), RoundClock(), 2, synchronous=True, log=bind("backend"))
    recorder.load_state_dict(data["steps"]["record"])
    recorder.start(2, source)
    api = SimpleNamespace(version=2, clients=["openfl_api/rank1", "openfl_api/rank2"])
    recorder.after_evaluate(api, Transfer(rank=1, nick_name="rank1", version=1, num_samples=10,
                                          metrics={"loss": 1.0}, client="openfl_api/rank1", accepted=True))
    recorder.close(2, "test")
    entries = read_record(path)
    assert [(e["kind"], e["version"]) for e in by_event(entries, "evaluation")] == [("federated", v) for v in (0, 1)]
    assert entries[-2]["event"] == "report" and entries[-2]["version"] == 1
