"""Federated and centralized evaluation: who evaluates which version, the final model, the
mistakes, and, on digits with 10 clients, the frontends' evaluation weighted by samples against
the backend's evaluation on the union of their test shares."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path

import pytest

import openfl_api as ofl
from openfl_api.errors import ConfigurationError, StepError
from openfl_api.record import read_record
from openfl_api.simulate import simulate
from recorded import federation, loop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def log_lines():
    from loguru import logger

    lines = []
    sink = logger.add(lambda message: lines.append(str(message).rstrip("\n")), level="INFO",
                      format="{level} {message}")
    yield lines
    logger.remove(sink)


def evaluated(path, kind="federated"):
    return [e["version"] for e in read_record(path) if e["event"] == "evaluation" and e["kind"] == kind]


def test_frontends_evaluate_every_kth_version_and_the_final_model_then_end(tmp_path):
    calls = []
    path = tmp_path / "run.jsonl"
    fed = federation(record=str(path), steps=[ofl.FederatedEvaluation(every=2)], body=loop(calls=calls))
    assert sorted(calls) == [0, 0, 2, 2, 3, 3]
    assert evaluated(path) == [0, 2, 3]
    for result in fed.results.values():
        assert result == {"version": 3, "reason": "version 3 reached max_version=3", "by_evaluate": True}
    uploads = [e for e in read_record(path) if e["event"] == "upload"]
    assert all(u["accepted"] for u in uploads) and len(uploads) == 6  # no update trained from the final model


def test_without_the_final_round_the_last_version_is_not_evaluated(tmp_path):
    calls = []
    path = tmp_path / "run.jsonl"
    fed = federation(record=str(path), steps=[ofl.FederatedEvaluation(every=1, final=False)], body=loop(calls=calls))
    assert sorted(calls) == [0, 0, 1, 1, 2, 2] and evaluated(path) == [0, 1, 2]
    assert {r["by_evaluate"] for r in fed.results.values()} == {False}


def test_a_frontend_may_evaluate_every_kth_version_without_a_backend_step(tmp_path):
    calls = []
    path = tmp_path / "run.jsonl"
    federation(record=str(path), body=loop(calls=calls, every=2))
    assert sorted(calls) == [0, 0, 2, 2] and evaluated(path) == [0, 2]


def test_evaluate_says_when_the_backend_asks_for_nothing(log_lines):
    calls = []
    federation(body=loop(calls=calls))
    assert calls == []
    assert log_lines.count("WARNING api.evaluate(...) evaluates nothing: the backend asks for no federated evaluation "
                           "(attach ofl.FederatedEvaluation(every=k) to the backend) and no every=k was given") == 2


def test_the_final_evaluation_stops_without_the_frontends_that_do_not_report_in_time(tmp_path, log_lines):
    def gave_up() -> bool:
        return any("within final_timeout" in line for line in log_lines)

    def stalls(api, model, opt):
        while api.download():
            if api.config.get("final"):  # hold the final model without reporting until the backend gives up
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not gave_up():
                    time.sleep(0.02)
                return "stalled"
            opt.zero_grad()
            model.weight.sum().backward()
            opt.step()
            if not api.upload(num_samples=1):
                break
            api.update_version()

    fed = federation(steps=[ofl.FederatedEvaluation(final_timeout=timedelta(milliseconds=300))], body=stalls,
                     frontends=1, status_interval=timedelta(milliseconds=100))
    assert fed.results[1] == "stalled"
    assert any(line.startswith("INFO final evaluation of version 3: 0 clients reported; waiting for test/rank1")
               for line in log_lines), log_lines
    assert ("WARNING final evaluation of version 3: no report from test/rank1 within final_timeout=0:00:00.300000; "
            "stopping without them") in log_lines
    assert fed.backend.stop_reason == "version 3 reached max_version=3"


def test_centralized_evaluation_runs_every_kth_version_the_start_and_the_final_one(tmp_path):
    path = tmp_path / "run.jsonl"
    seen = []
    fed = federation(record=str(path), versions=3, body=loop(evaluate=False), steps=[
        ofl.CentralizedEvaluation(lambda: (7, {"weight": float(seen.append(1) or len(seen))}), every=2, kind="test")])
    assert evaluated(path, "test") == [0, 2, 3]
    entries = [e for e in read_record(path) if e["event"] == "evaluation"]
    assert [e["metrics"] for e in entries] == [{"weight": {"mean": float(n)}} for n in (1, 2, 3)]
    assert entries[0]["num_samples"] == 7
    assert fed.backend.history.metrics("test", 2) == {"weight": {"mean": 2.0}}


def test_a_centralized_evaluation_returning_nonsense_stops_the_federation_naming_the_step():
    with pytest.raises(StepError, match="step 'CentralizedEvaluation' raised at at_loop: ConfigurationError: the "
                                        "evaluation function of CentralizedEvaluation must return"):
        federation(versions=2, body=loop(evaluate=False), steps=[ofl.CentralizedEvaluation(lambda: 0.5)])


def test_a_step_that_raises_stops_at_once_even_when_a_stop_is_deferred():
    class Boom(ofl.Step):
        roles = frozenset({"backend"})

        def after_aggregate(self, api):
            if api.version == 2:
                raise ValueError("boom")

    fed = None
    with pytest.raises(StepError, match="step 'Boom' raised at after_aggregate"):
        fed = federation(versions=4, steps=[ofl.FederatedEvaluation(), Boom()])
    assert fed is None


@pytest.mark.parametrize("build,match", [
    (lambda: ofl.FederatedEvaluation(every=0), "FederatedEvaluation\\(every=...\\) must be an integer >= 1"),
    (lambda: ofl.FederatedEvaluation(final="yes"), "FederatedEvaluation\\(final=...\\) must be True or False"),
    (lambda: ofl.FederatedEvaluation(final_timeout=5), "final_timeout=...\\) must be a positive datetime.timedelta"),
    (lambda: ofl.CentralizedEvaluation("f"), "CentralizedEvaluation\\(evaluate=...\\) must be a function"),
    (lambda: ofl.CentralizedEvaluation(dict, every=True), "CentralizedEvaluation\\(every=...\\) must be an integer"),
    (lambda: ofl.CentralizedEvaluation(dict, kind="federated"), "kind=...\\) must be an identifier other than"),
])
def test_evaluation_steps_check_their_arguments_when_built(build, match):
    with pytest.raises(ConfigurationError, match=match):
        build()


@pytest.mark.parametrize("call,match", [
    (lambda api: api.evaluate("test"), "api.evaluate\\(fn\\) needs a function returning \\(num_samples, "),
    (lambda api: api.evaluate(lambda: {"accuracy": 1.0}),
     "the evaluation function of api.evaluate must return \\(num_samples, \\{name: value\\}\\), got dict"),
    (lambda api: api.evaluate(lambda: (0, {"accuracy": 1.0})), "\\(num_samples=...\\) must be an integer in \\[1, "),
    (lambda api: api.evaluate(lambda: (3, {"accuracy": "high"})), "metric 'accuracy' must be a finite number"),
    (lambda api: api.evaluate(lambda: (3, {}), every=-2), "api.evaluate\\(every=...\\) must be an integer >= 1"),
    (lambda api: api.evaluate(lambda: (3, {}), client=4), "evaluate\\(client=...\\) needs API\\(clients=\\[...\\]\\)"),
])
def test_evaluate_refuses_mistakes_before_anything_is_sent(call, match):
    errors = []

    def body(api, model, opt):
        api.download()
        try:
            call(api)
        except ConfigurationError as exc:
            errors.append(exc)
        api.stop("test over")

    federation(versions=1, frontends=1, steps=[ofl.FederatedEvaluation(final=False)], body=body)
    assert len(errors) == 1 and re.search(match, str(errors[0])), errors


def test_evaluate_needs_a_downloaded_model():
    errors = []

    def body(api, model, opt):
        try:
            api.evaluate(lambda: (1, {}))
        except ConfigurationError as exc:
            errors.append(str(exc))
        api.stop("test over")

    federation(versions=1, frontends=1, body=body)
    assert errors == ["api.evaluate() evaluates the downloaded global model: call it after api.download() has "
                      "returned True"]


def test_evaluate_on_the_backend_returns_false_like_download():
    assert ofl.API(frontend=False).evaluate(lambda: (1, {})) is False


def test_on_digits_with_10_clients_the_federated_evaluation_weighted_by_samples_is_the_centralized_one(tmp_path):
    pytest.importorskip("sklearn")
    namespace = {"__name__": "digits_evaluation"}
    exec(compile((ROOT / "examples" / "digits_evaluation.py").read_text(), "digits_evaluation.py", "exec"), namespace)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = simulate(lambda: namespace["federation"](["--rounds", "3"]), nproc_per_node=2,
                           timeout=timedelta(minutes=2))[0]
    finally:
        torch.set_num_threads(threads)
    federated, centralized = history.evaluations["federated"], history.evaluations["centralized"]
    assert sorted(federated) == sorted(centralized) == [0, 1, 2, 3]
    for version in federated:
        assert federated[version]["clients"] == 10
        assert federated[version]["num_samples"] == centralized[version]["num_samples"] == 449  # the whole test set
        for metric in ("accuracy", "loss"):
            assert abs(federated[version]["metrics"][metric]["mean"]
                       - centralized[version]["metrics"][metric]["mean"]) < 1e-6, (version, metric)
    assert centralized[3]["metrics"]["accuracy"]["mean"] > centralized[0]["metrics"]["accuracy"]["mean"]
    assert [history.versions[v]["uploads"] for v in (1, 2, 3)] == [10, 10, 10]  # none trained from the final model
