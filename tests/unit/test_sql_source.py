"""The SQL adapter and the source runner, on SQLite and (integration) PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from adapters.sql import SqlSource
from gateway.config import SourceSettings
from gateway.errors import ConfigurationError, FencingError
from gateway.sources.runner import SourceRunner, build_adapter
from gateway.store import EventStore
from tests.legacy import T0, make_orders, source_settings, touch_orders


def _runner(store: EventStore, url: str, **kw) -> SourceRunner:  # type: ignore[no-untyped-def]
    return SourceRunner(SourceSettings.model_validate(source_settings(url, **kw)), store, sleep=lambda s: None)


def _drain(runner: SourceRunner) -> int:
    polls = 0
    while runner.run_once().has_more:
        polls += 1
    return polls + 1


def test_reads_all_once_and_again_is_noop(sqlite_store: EventStore, legacy_url: str) -> None:
    engine = make_orders(legacy_url, 2500)
    r = _runner(sqlite_store, legacy_url)
    assert _drain(r) == 3
    assert sqlite_store.stats()["events"] == 2500
    assert r.status.events_accepted == 2500
    # Poll again over the same rows: nothing new.
    _drain(r)
    assert sqlite_store.stats()["events"] == 2500
    # A fresh runner from the committed cursor reads nothing either (after the first stopped and
    # released the source's lease; while it held it, the fresh one would be standby).
    r.close()
    r2 = _runner(sqlite_store, legacy_url)
    _drain(r2)
    assert sqlite_store.stats()["events"] == 2500 and r2.status.events_accepted == 0
    # Updating 100 rows gives exactly 100 new events.
    touch_orders(engine, list(range(1, 101)), T0 + timedelta(days=1))
    _drain(r2)
    assert sqlite_store.stats()["events"] == 2600 and r2.status.events_accepted == 100
    engine.dispose()


def test_event_content_is_exact_and_utc(sqlite_store: EventStore, legacy_url: str) -> None:
    engine = make_orders(legacy_url, 3)
    r = _runner(sqlite_store, legacy_url)
    _drain(r)
    items = sqlite_store.list_events(__import__("gateway.store").store.EventFilter(), limit=10)
    first = items[0].event
    assert first["subject"] == "order/1"
    assert first["data"]["amount"] == "1.25"  # DECIMAL kept exact, as text
    assert first["data"]["status"] == "NEW"  # CHAR(10) padding trimmed
    assert first["time"] == "2024-01-01T12:00:00.001000Z"
    assert first["sourcename"] == "orders" and first["sourceadapter"] == "sql"
    assert '"key":1' in first["sourceposition"]
    engine.dispose()


def test_ties_across_batch_boundaries_and_restart(sqlite_store: EventStore, legacy_url: str) -> None:
    engine = make_orders(legacy_url, 3000, same_timestamp=True)
    r = _runner(sqlite_store, legacy_url)
    r.run_once()  # first batch of 1000 committed
    r.close()  # the process stops (releasing the source's lease) ...
    restarted = _runner(sqlite_store, legacy_url)  # ... and restarts between batches
    _drain(restarted)
    assert sqlite_store.stats()["events"] == 3000
    assert restarted.status.duplicates == 0  # nothing re-read
    engine.dispose()


def test_incrementing_mode(sqlite_store: EventStore, sqlite_url: str, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'inc.db'}"
    engine = make_orders(url, 1500)
    r = _runner(sqlite_store, url, mode="incrementing", timestamp_column=None)
    _drain(r)
    assert sqlite_store.stats()["events"] == 1500
    assert sqlite_store.get_cursor("orders").cursor == {"key": 1500}  # type: ignore[union-attr]
    engine.dispose()


def test_second_runner_fences_the_first(sqlite_store: EventStore, tmp_path) -> None:
    """A second runner no longer steals the source at once: it is standby while the first holds the
    lease, takes it over once the lease expired (the first is stuck), and then the first's cursor
    write is fenced: nothing of its batch is written."""
    now = [datetime(2024, 1, 1, tzinfo=timezone.utc)]
    store = EventStore(sqlite_store.engine, clock=lambda: now[0])
    url = f"sqlite:///{tmp_path / 'f.db'}"
    engine = make_orders(url, 2500)
    a = _runner(store, url)
    a.run_once()
    b = _runner(store, url)
    with pytest.raises(FencingError, match="standby"):
        b.run_once()  # a holds the lease
    now[0] += timedelta(seconds=31)  # a renews nothing for longer than the 30 s TTL
    b.run_once()
    with pytest.raises(FencingError, match="refused"):
        a.run_once()  # a's cursor write (epoch 1) affects 0 rows; its events roll back with it
    assert store.get_cursor("orders").epoch == 2 and store.stats()["events"] == 2000  # type: ignore[union-attr]
    _drain(b)
    assert store.stats()["events"] == 2500
    engine.dispose()


def test_unmappable_record_goes_to_dead_letters_with_the_batch(sqlite_store: EventStore, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = make_orders(url, 5)
    settings = source_settings(url)
    settings["mapping"]["key"] = ["id", "customer"]
    settings["mapping"]["data"] = ["amount", "nonexistent"]
    r = SourceRunner(SourceSettings.model_validate(settings), sqlite_store, sleep=lambda s: None)
    r.run_once()
    dead = sqlite_store.list_dead_letters()
    assert len(dead) == 5 and "no field 'nonexistent'" in dead[0].reason
    assert sqlite_store.get_cursor("orders").cursor["key"] == 5  # type: ignore[index,union-attr]
    engine.dispose()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"table": "nope"}, "table 'nope' does not exist"),
        ({"key_column": "nonexistent_col"}, "column(s) 'nonexistent_col' not in table"),
    ],
)
def test_names_checked_against_reflected_metadata(tmp_path, patch, message) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    make_orders(url, 1).dispose()
    cfg = source_settings(url)
    cfg["config"].update(patch)
    adapter = build_adapter(SourceSettings.model_validate(cfg))
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        adapter.open()


@pytest.mark.parametrize("bad", ["orders; DROP TABLE x", 'id"--', "ordérs", "ｏrders"])
def test_injection_shaped_names_rejected(bad: str) -> None:
    with pytest.raises(Exception, match="not a plain SQL identifier"):
        SqlSource.parse_config({"url": "sqlite://", "table": bad, "key_column": "id", "timestamp_column": "ts"})


def test_failed_outbox_commit_leaves_cursor_and_outbox_unchanged(sqlite_store: EventStore, tmp_path) -> None:
    """REL-02: nothing is acknowledged (the cursor does not move) unless the outbox commit succeeds."""
    from gateway.errors import StoreUnavailableError
    from gateway.resilience import RetryPolicy

    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = make_orders(url, 10)
    r = SourceRunner(SourceSettings.model_validate(source_settings(url, batch_size=5)), sqlite_store,
                     retry=RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001, deadline=1), sleep=lambda s: None)
    r.run_once()
    before = sqlite_store.get_cursor("orders")
    real_accept = sqlite_store.accept

    def failing_accept(*a, **kw):  # type: ignore[no-untyped-def]
        raise StoreUnavailableError("outbox transaction failed: OperationalError")

    sqlite_store.accept = failing_accept  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailableError):
        r.run_once()
    sqlite_store.accept = real_accept  # type: ignore[method-assign]
    assert sqlite_store.get_cursor("orders") == before and sqlite_store.stats()["events"] == 5
    _drain(r)  # the same rows are read again after the outage: none lost, none doubled
    assert sqlite_store.stats()["events"] == 10
    engine.dispose()
