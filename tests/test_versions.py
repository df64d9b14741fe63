"""The version rules as pure bookkeeping (openfl_api.versions): judge, accept, advance, no sockets."""

from __future__ import annotations

import pytest

from openfl_api.asynchronous import Asynchronous
from openfl_api.aggregate.staleness import Polynomial
from openfl_api.versions import Versions, client_order


def test_synchronous_accepts_the_current_version_once_per_client() -> None:
    versions = Versions()
    assert versions.judge(0, "a").accepted
    versions.accept("a", 1.0, 1.0)
    verdict = versions.judge(0, "a")
    assert not verdict.accepted and verdict.kind == "duplicate"
    assert verdict.reason == "duplicate: client a has an accepted upload for version 0 already"
    assert versions.judge(0, "b").accepted


@pytest.mark.parametrize("tag,kind,reason", [
    (0, "stale", "stale: trained from version 0 but the global version is 1"),
    (2, "future", "future: trained from version 2 but the global version is only 1"),
])
def test_synchronous_discards_stale_and_future_uploads_naming_both_versions(tag, kind, reason) -> None:
    versions = Versions()
    versions.accept("a", 1.0, 1.0)
    versions.advance()
    verdict = versions.judge(tag, "b")
    assert (verdict.accepted, verdict.kind, verdict.reason) == (False, kind, reason)


def test_advance_counts_the_version_and_starts_the_next() -> None:
    versions = Versions()
    for client in ("a", "b", "c"):
        versions.accept(client, 1.0, 1.0)
    assert versions.advance() == 3
    assert (versions.version, versions.accepted) == (1, 0)
    assert versions.took_part(["a"]) is False  # took part in version 0, not 1


def test_asynchronous_weights_by_staleness_and_bounds_it() -> None:
    versions = Versions(Asynchronous(alpha=0.5, staleness=Polynomial(a=1.0), max_staleness=1))
    for _ in range(2):
        versions.accept("a", 1.0, 1.0)
        versions.advance()
    assert versions.judge(1, "a").weight == pytest.approx(0.5)
    verdict = versions.judge(0, "a")
    assert not verdict.accepted and verdict.kind == "too stale"
    assert versions.judge(2, "a").accepted  # any client, any number of times: no duplicates


def test_mixing_weight_is_alpha_times_the_mean_staleness_weight() -> None:
    versions = Versions(Asynchronous(alpha=0.8))
    versions.accept("a", weighted=1.0, plain=2.0)
    versions.accept("b", weighted=2.0, plain=2.0)
    assert versions.mixing() == pytest.approx(0.8 * 3.0 / 4.0)
    assert Versions().mixing() is None


def test_withdrawn_uploads_leave_the_count_and_the_mixing_weight_as_if_never_accepted() -> None:
    versions, alone = Versions(Asynchronous(alpha=0.5)), Versions(Asynchronous(alpha=0.5))
    for client, weighted in (("a", 0.25), ("b", 0.7), ("c", 0.1)):
        versions.accept(client, weighted, 1.0)
    alone.accept("b", 0.7, 1.0)
    assert versions.withdraw(["a", "c", "z"]) == 2
    assert versions.accepted == alone.accepted == 1 and versions.mixing() == alone.mixing()
    assert not versions.took_part(["a", "c"]) and versions.took_part(["b"])


def test_state_round_trips_the_version_in_progress() -> None:
    versions = Versions()
    versions.accept("a", 1.0, 1.0)
    versions.advance()
    versions.accept("b", 2.0, 2.0)
    copy = Versions()
    copy.load_state_dict(versions.state_dict())
    assert copy.state_dict() == versions.state_dict()
    assert copy.judge(1, "b").kind == "duplicate"


def test_client_order_is_natural() -> None:
    assert sorted(["10", "b", "2", "a", "1"], key=client_order) == ["1", "2", "10", "a", "b"]
