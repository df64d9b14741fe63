"""The backend's status line (openfl_api.backend.status): what a stalled version says."""

from __future__ import annotations

from openfl_api.backend.status import VersionStatus, names


def test_the_line_names_uploads_missing_and_connected() -> None:
    status = VersionStatus(version=3, accepted=1, needed=3, needed_by="AggregateCount(count=3)", uploaded=["2"],
                           missing=["1", "3"], connected=["1", "2"], unconnected=["3"])
    assert status.line() == "version 3: 1 of 3 uploads (from 2); waiting for 1, 3; connected: 1, 2"
    assert status.unmet() is not None  # 3 is not connected, so the connected ones cannot complete it


def test_a_count_the_connected_frontends_can_still_meet_is_no_warning() -> None:
    status = VersionStatus(version=3, accepted=1, needed=2, needed_by="AggregateCount(count=2)", uploaded=["2"],
                           missing=["1", "3"], connected=["1", "2"], unconnected=["3"])
    assert status.unmet() is None


def test_a_count_the_connected_frontends_cannot_meet_is_named_with_the_fix() -> None:
    status = VersionStatus(version=0, accepted=2, needed=3, needed_by="AggregateCount(count=3)", uploaded=["1", "2"],
                           missing=["3"], connected=["1", "2"], unconnected=["3"])
    assert status.unmet() == (
        "The connected frontends cannot complete it: AggregateCount(count=3) needs 1 more upload and only 0 "
        "connected clients have yet to upload; start 3 or lower the count the step needs")


def test_when_every_allowed_frontend_is_connected_the_fix_is_world_size_or_the_count() -> None:
    status = VersionStatus(version=0, accepted=2, needed=3, needed_by="AggregateCount(count=3)", uploaded=["1", "2"],
                           connected=["1", "2"])
    assert "raise world_size and start more frontends, or lower the count" in status.unmet()


def test_asynchronous_lines_have_no_missing_clients_and_the_start_says_what_it_waits_for() -> None:
    status = VersionStatus(version=5, accepted=1, needed=2, uploaded=["1"], connected=["1", "2"], asynchronous=True)
    assert status.line() == "version 5: 1 of 2 uploads (from 1); connected: 1, 2"
    assert status.unmet() is None
    start = VersionStatus(version=0, accepted=0, missing=["3"], connected=["1", "2"], unconnected=["3"], start=(2, 3))
    assert start.line() == ("version 0: asynchronous start waits for 3 frontends to ask for a model, 2 have; "
                            "waiting for 3; connected: 1, 2")
    assert start.unmet() == ("The connected frontends cannot start it: the asynchronous start waits for 3 frontends "
                             "to ask for a model and only 2 have; start 3 or lower Asynchronous(min_frontends=...)")


def test_long_lists_are_cut() -> None:
    assert names([str(i) for i in range(13)]) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 3 more"
    assert names([]) == "none"
