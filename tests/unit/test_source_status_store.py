"""Persisted source status and once-only dead letters -- on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json

import pytest

from gateway.store import EventStore
from gateway.store.status import LAST_ERROR_MAX

BREAKER = {"name": "source:src", "state": "open", "failure_rate": 75.0, "retry_after": 12.5, "opened_at": 1000.0}
DRIFT = {"baseline": "aaa", "current": "bbb", "current_parts": {"a.wsdl": "2"}, "changed": ["a.wsdl"], "detected_at": "2024-01-01T00:00:00Z"}


def test_status_is_saved_read_and_listed(any_store: EventStore) -> None:
    assert any_store.get_source_status("src") is None and any_store.list_source_status() == []
    assert any_store.save_source_status(
        "src", state="polling", owner="h:1:abc", epoch=1, polls=3, events_accepted=7, duplicates=2, rejected=1,
        breaker=BREAKER, last_error="x" * (LAST_ERROR_MAX + 50), drift=DRIFT,
    )
    any_store.save_source_status("other", state="idle", owner="h:1:def", epoch=1)
    st = any_store.get_source_status("src")
    assert st is not None
    assert (st.state, st.owner, st.epoch, st.polls, st.events_accepted, st.duplicates, st.rejected) == (
        "polling", "h:1:abc", 1, 3, 7, 2, 1,
    )
    assert st.breaker == BREAKER and st.drift == DRIFT and st.drift_detected
    assert st.last_error == "x" * LAST_ERROR_MAX
    assert st.desired_state == "running" and st.desired_generation == 0 and st.fingerprint is None
    assert st.updated_at.tzinfo is not None and st.last_poll_at is None
    assert [s.source_name for s in any_store.list_source_status()] == ["other", "src"]
    json.dumps(st.to_dict())  # JSON-safe for `sources list --json`
    # An update replaces the runner's columns.
    any_store.save_source_status("src", state="idle", owner="h:1:abc", epoch=1, polls=4)
    st = any_store.get_source_status("src")
    assert st is not None and st.state == "idle" and st.polls == 4 and st.last_error is None and st.drift is None


def test_runner_writes_never_touch_operator_wishes_or_the_baseline(any_store: EventStore) -> None:
    # Operator commands and the baseline may come first: they create the row.
    row = any_store.set_source_desired_state("src", "paused")
    assert row.state == "unknown" and row.desired_state == "paused" and row.desired_generation == 1
    assert row.desired_at is not None
    any_store.set_fingerprint_baseline("src", "digest-1", {"a.wsdl": "1", "b.xsd": "2"})
    assert any_store.save_source_status("src", state="idle", owner="h:1:abc", epoch=3, drift=DRIFT)
    st = any_store.get_source_status("src")
    assert st is not None and st.state == "idle" and st.epoch == 3 and st.drift == DRIFT
    assert st.desired_state == "paused" and st.desired_generation == 1
    assert st.fingerprint == "digest-1" and st.fingerprint_parts == {"a.wsdl": "1", "b.xsd": "2"}
    assert st.fingerprint_at is not None
    # ... and the other way round: operator commands keep the runner's columns.
    row = any_store.set_source_desired_state("src", "running")
    assert row.desired_state == "running" and row.desired_generation == 2 and row.state == "idle" and row.epoch == 3
    # A new baseline clears the recorded drift (accept-drift).
    any_store.set_fingerprint_baseline("src", "digest-2", {"a.wsdl": "9"})
    st = any_store.get_source_status("src")
    assert st is not None and st.fingerprint == "digest-2" and st.drift is None and st.state == "idle"
    with pytest.raises(ValueError, match="running"):
        any_store.set_source_desired_state("src", "stopped")


def test_a_runner_with_an_older_epoch_cannot_overwrite_a_newer_ones_status(any_store: EventStore) -> None:
    assert any_store.save_source_status("src", state="idle", owner="new", epoch=5)
    assert not any_store.save_source_status("src", state="fenced", owner="old", epoch=4)
    assert not any_store.save_source_status("src", state="fenced", owner="no-epoch", epoch=None)
    st = any_store.get_source_status("src")
    assert st is not None and (st.owner, st.state, st.epoch) == ("new", "idle", 5)
    assert any_store.save_source_status("src", state="polling", owner="new", epoch=5)  # the same runner
    assert any_store.save_source_status("src", state="idle", owner="newer", epoch=6)
    st = any_store.get_source_status("src")
    assert st is not None and (st.owner, st.epoch) == ("newer", 6)


def test_dead_letter_once_deduplicates_on_reason_and_payload(any_store: EventStore) -> None:
    args = {"stage": "source", "source_name": "src", "error_class": "SoapFaultError", "reason": "no such order"}
    first, created = any_store.add_dead_letter_once(**args, payload='{"cursor": 1}')
    assert created
    assert any_store.add_dead_letter_once(**args, payload='{"cursor": 1}') == (first, False)
    other, created = any_store.add_dead_letter_once(**args, payload='{"cursor": 2}')
    assert created and other != first
    _, created = any_store.add_dead_letter_once(**{**args, "reason": "another fault"}, payload='{"cursor": 1}')
    assert created
    _, created = any_store.add_dead_letter_once(**{**args, "source_name": "b"}, payload='{"cursor": 1}')
    assert created
    # A custom comparison: the same cursor with different volatile details is the same failure.
    same = lambda old, new: json.loads(old)["cursor"] == json.loads(new)["cursor"]
    assert any_store.add_dead_letter_once(**args, payload='{"cursor": 2, "at": "later"}', same=same) == (other, False)
    assert len(any_store.list_dead_letters()) == 4
