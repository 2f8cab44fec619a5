"""Acceptance tests of the SQL source at the issue's scale, on every legacy dialect.

What each group proves:

* **Ties** -- a (timestamp, key) cursor neither skips nor repeats rows that share one timestamp,
  at 3,000 rows and batches of 1,000, across restarts between batches, and while rows with the
  same timestamp and higher keys keep arriving between polls.
* **Injection-shaped names** -- ``gateway check`` refuses them with exit code 2 and a message
  naming the file, the path in it and what was expected; nothing reaches the database.
* **Time** -- microsecond timestamps survive the round trip into event time, ids and the cursor;
  naive columns are read in ``naive_timezone`` and emitted in correct UTC across DST changes.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, inspect
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import SourceSettings
from gateway.events import format_time
from gateway.events.ids import event_id
from gateway.sources.runner import SourceRunner
from gateway.store import EventFilter, EventStore
from tests.legacy import T0, add_orders, make_orders, source_settings


def _runner(store: EventStore, url: str, **kw: Any) -> SourceRunner:
    """A new runner with a new adapter (what a process restart builds)."""
    return SourceRunner(SourceSettings.model_validate(source_settings(url, **kw)), store, sleep=lambda s: None)


def _drain(runner: SourceRunner, max_polls: int = 100) -> None:
    """Poll until the source has nothing more; a cursor that never advances fails, not hangs."""
    for _ in range(max_polls):
        if not runner.run_once().has_more:
            return
    pytest.fail(f"the source still has more after {max_polls} polls: the cursor is not advancing")


def _events(store: EventStore) -> list[dict[str, Any]]:
    return [item.event for item in store.list_events(EventFilter(), limit=1_000_000)]


def _keys(store: EventStore) -> list[int]:
    return [int(e["data"]["id"]) for e in _events(store)]


def _assert_keys(got: list[Any], first: int, last: int, what: str) -> None:
    """``got`` is exactly ``first..last`` in order; a short message (pytest's diff of two
    3,000-item lists takes minutes)."""
    expected = list(range(first, last + 1))
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    repeated = sorted({k for k in got if got.count(k) > 1}) if len(got) < 10_000 else "?"
    pytest.fail(
        f"{what}: got {len(got)} keys, expected {first}..{last}; missing {missing[:10]} ({len(missing)}), "
        f"unexpected {unexpected[:10]} ({len(unexpected)}), repeated {repeated if isinstance(repeated, str) else repeated[:10]}"
    )


# --------------------------------------------------------------------------- ties


@pytest.mark.parametrize("restart", ["stop", "crash"])
def test_tie_of_3000_rows_across_two_restarts(sqlite_store: EventStore, legacy_url: str, restart: str) -> None:
    """3,000 rows share one timestamp; batch 1,000; a restart between batch 1-2 and 2-3.

    ``stop``: the process stops (``close()`` releases the source's lease); ``crash``: it dies
    holding the lease, and the next one takes over when the lease has expired (the store's clock
    is moved on). Either way every row is emitted exactly once, no row is even re-read
    (``duplicates == 0``: the store never had to drop a repeat) and the committed cursor ends at
    the last key.
    """
    now = [T0]
    store = EventStore(sqlite_store.engine, clock=lambda: now[0])
    engine = make_orders(legacy_url, 3000, same_timestamp=True)
    try:
        for batch_no in range(3):
            runner = _runner(store, legacy_url, batch_size=1000)  # new runner + new adapter
            batch = runner.run_once()
            _assert_keys([r.data["id"] for r in batch.records], batch_no * 1000 + 1, batch_no * 1000 + 1000, f"batch {batch_no + 1}")
            assert runner.status.events_accepted == 1000
            assert runner.status.duplicates == 0
            if restart == "stop":
                runner.close()
            else:
                runner.adapter.close()  # only the legacy connection dies with the process
                now[0] += timedelta(hours=1)  # past any lease TTL
        final = _runner(store, legacy_url, batch_size=1000)
        last = final.run_once()
        assert last.records == [] and not last.has_more
        assert final.status.duplicates == 0
        final.close()
        keys = _keys(store)
        _assert_keys(sorted(keys), 1, 3000, "the sink")  # all, each once
        assert store.stats()["events"] == 3000
        assert store.get_cursor("orders").cursor == {"ts": format_time(T0), "key": 3000}  # type: ignore[union-attr]
    finally:
        engine.dispose()


def test_tie_group_straddling_a_boundary_grows_between_polls(sqlite_store: EventStore, legacy_url: str) -> None:
    """A tie group straddles the batch boundary while rows with the SAME timestamp and higher keys
    are inserted between polls (and across a restart): each is picked up exactly once."""
    engine = make_orders(legacy_url, 1500, same_timestamp=True)
    try:
        r = _runner(sqlite_store, legacy_url, batch_size=1000)
        assert len(r.run_once().records) == 1000  # keys 1..1000; 1001..1500 still ahead
        add_orders(engine, 300, start=1501, same_timestamp=True)  # same T0, higher keys
        _assert_keys([rec.data["id"] for rec in r.run_once().records], 1001, 1800, "poll 2")
        add_orders(engine, 700, start=1801, same_timestamp=True)
        r.close()
        r = _runner(sqlite_store, legacy_url, batch_size=1000)  # restart inside the tie group
        _assert_keys([rec.data["id"] for rec in r.run_once().records], 1801, 2500, "poll 3, after a restart")
        add_orders(engine, 1, start=2501, same_timestamp=True)
        add_orders(engine, 1, start=2502, when=T0 + timedelta(microseconds=1))  # first row after the tie
        _drain(r)
        assert r.status.duplicates == 0
        _assert_keys(sorted(_keys(sqlite_store)), 1, 2502, "the sink")
        assert sqlite_store.get_cursor("orders").cursor == {  # type: ignore[union-attr]
            "ts": format_time(T0 + timedelta(microseconds=1)),
            "key": 2502,
        }
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- names

_cli = CliRunner()


def _write_config(tmp_path: Path, legacy: str, **config: Any) -> Path:
    src = source_settings(legacy, name="orders")
    src["config"].update(config)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'gw.db'}"}, "sources": [src]}))
    return cfg


def _legacy_tables(legacy: str) -> list[str]:
    engine = create_engine(legacy)
    try:
        return inspect(engine).get_table_names()
    finally:
        engine.dispose()


@pytest.mark.parametrize("connect", [False, True], ids=["check", "check--connect"])
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("table", "legacy_orders; DROP TABLE legacy_orders", "not a plain SQL identifier"),
        ("table", "orders; DROP TABLE x", "not a plain SQL identifier"),
        ("key_column", 'id"--', "not a plain SQL identifier"),
        ("timestamp_column", "updated_at) OR 1=1 --", "not a plain SQL identifier"),
        ("table", "a.b.legacy_orders", "expected 'table' or 'schema.table'"),
    ],
)
def test_check_rejects_injection_shaped_names(
    tmp_path: Path, field: str, value: str, expected: str, connect: bool
) -> None:
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 3).dispose()
    cfg = _write_config(tmp_path, legacy, **{field: value})
    result = _cli.invoke(app, ["check", "-c", str(cfg), *(["--connect"] if connect else [])])
    assert result.exit_code == 2, result.output
    line = next(ln for ln in result.output.splitlines() if expected in ln)
    assert line.startswith(f"{cfg}: sources[0].config.{field}: ")  # the file and the path in it
    assert "letters, digits, _ and $" in line or "schema.table" in line  # what was expected
    assert "legacy_orders" in _legacy_tables(legacy)  # nothing was executed
    assert (tmp_path / "legacy.db").stat().st_size > 0


def test_check_connect_rejects_a_column_the_table_lacks(tmp_path: Path) -> None:
    """Plain identifiers that the reflected table lacks: only ``--connect`` can tell."""
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 3).dispose()
    cfg = _write_config(tmp_path, legacy, columns=["id", "updated_at", "nonexistent_col"])
    assert _cli.invoke(app, ["check", "-c", str(cfg)]).exit_code == 0  # syntactically fine
    result = _cli.invoke(app, ["check", "--connect", "-c", str(cfg)])
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.output.splitlines() if "nonexistent_col" in ln]
    assert line.startswith(f"{cfg}: sources[0]")  # the file and the source
    assert "column(s) 'nonexistent_col' not in table 'legacy_orders'" in line  # what is wrong
    assert "(columns: id, customer, amount, status, updated_at)" in line  # what was expected
    assert "legacy_orders" in _legacy_tables(legacy)


def test_check_connect_names_the_config_field_of_a_missing_column(tmp_path: Path) -> None:
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 3).dispose()
    cfg = _write_config(tmp_path, legacy, columns=["id", "updated_at", "nonexistent_col"])
    result = _cli.invoke(app, ["check", "--connect", "-c", str(cfg)])
    assert f"{cfg}: sources[0].config.columns" in result.output


def test_check_connect_names_a_missing_table(tmp_path: Path) -> None:
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 3).dispose()
    cfg = _write_config(tmp_path, legacy, table="no_such_table")
    result = _cli.invoke(app, ["check", "--connect", "-c", str(cfg)])
    assert result.exit_code == 2, result.output
    assert f"{cfg}: sources[0]" in result.output
    assert "config.table: table 'no_such_table' does not exist" in result.output


# --------------------------------------------------------------------------- time

_MICROS = [
    T0 + timedelta(microseconds=1),
    T0 + timedelta(microseconds=2),
    T0 + timedelta(microseconds=2),  # a tie at microsecond precision
    T0 + timedelta(microseconds=999_999),
    T0 + timedelta(seconds=1),
    T0 + timedelta(seconds=1, microseconds=500_001),
    T0 + timedelta(days=200, microseconds=123_457),
]


def test_microsecond_timestamps_round_trip_exactly(sqlite_store: EventStore, legacy_url: str) -> None:
    """Microseconds survive into event time, event data and ids; a cursor bound at full precision
    (batch size 1, neighbours 1 µs apart) neither re-reads nor skips."""
    engine = make_orders(legacy_url, 0)
    try:
        for key, ts in enumerate(_MICROS, start=1):
            add_orders(engine, 1, start=key, when=ts)
        r = _runner(sqlite_store, legacy_url, batch_size=1)
        _drain(r)
        assert r.status.duplicates == 0
        events = _events(sqlite_store)
        assert [(int(e["data"]["id"]), e["time"]) for e in events] == [
            (k, format_time(ts)) for k, ts in enumerate(_MICROS, start=1)
        ]
        for key, (ev, ts) in enumerate(zip(events, _MICROS, strict=True), start=1):
            assert ev["data"]["updated_at"] == format_time(ts)
            assert ev["id"] == event_id("orders", "order", key, ts)
        assert sqlite_store.get_cursor("orders").cursor == {"ts": format_time(_MICROS[-1]), "key": len(_MICROS)}  # type: ignore[union-attr]
    finally:
        engine.dispose()


_BERLIN = [
    # naive local wall time in Europe/Berlin -> the UTC instant it denotes
    (datetime(2024, 1, 15, 12, 0, 0), datetime(2024, 1, 15, 11, 0, 0)),  # CET, +01:00
    (datetime(2024, 3, 31, 1, 59, 59, 999_999), datetime(2024, 3, 31, 0, 59, 59, 999_999)),  # last CET moment
    (datetime(2024, 3, 31, 3, 0, 0), datetime(2024, 3, 31, 1, 0, 0)),  # first CEST moment, +02:00
    (datetime(2024, 3, 31, 3, 0, 0, 1), datetime(2024, 3, 31, 1, 0, 0, 1)),
    (datetime(2024, 7, 1, 12, 0, 0), datetime(2024, 7, 1, 10, 0, 0)),  # CEST
    (datetime(2024, 10, 27, 1, 59, 59), datetime(2024, 10, 26, 23, 59, 59)),  # before the repeated hour
    (datetime(2024, 10, 27, 3, 0, 0), datetime(2024, 10, 27, 2, 0, 0)),  # after it, CET again
    (datetime(2024, 12, 24, 18, 30, 0, 250_000), datetime(2024, 12, 24, 17, 30, 0, 250_000)),
]


@pytest.mark.parametrize("batch_size", [1, 1000])
def test_naive_timestamps_in_a_configured_zone_become_utc(
    sqlite_store: EventStore, legacy_url: str, batch_size: int
) -> None:
    """Naive columns read in Europe/Berlin across both 2024 DST changes: correct UTC event times,
    and the cursor (kept in UTC, bound back in local time) reads each row once."""
    engine = make_orders(legacy_url, 0)
    try:
        for key, (local, _) in enumerate(_BERLIN, start=1):
            add_orders(engine, 1, start=key, when=local)  # naive: stored as written
        r = _runner(sqlite_store, legacy_url, batch_size=batch_size, naive_timezone="Europe/Berlin")
        _drain(r)
        assert r.status.duplicates == 0
        got = [(int(e["data"]["id"]), e["time"]) for e in _events(sqlite_store)]
        expected = [(k, format_time(utc.replace(tzinfo=timezone.utc))) for k, (_, utc) in enumerate(_BERLIN, start=1)]
        assert got == expected
        for key, (_, utc) in enumerate(_BERLIN, start=1):
            assert event_id("orders", "order", key, utc.replace(tzinfo=timezone.utc)) in {e["id"] for e in _events(sqlite_store)}
        # A later row after a restart: the committed UTC cursor binds back to the right local time.
        add_orders(engine, 1, start=100, when=datetime(2024, 12, 24, 18, 30, 0, 250_001))
        r.close()
        r2 = _runner(sqlite_store, legacy_url, batch_size=batch_size, naive_timezone="Europe/Berlin")
        _drain(r2)
        assert r2.status.events_accepted == 1 and r2.status.duplicates == 0
        r2.close()
    finally:
        engine.dispose()


def test_naive_timestamp_in_the_dst_gap_does_not_skip_rows(sqlite_store: EventStore, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gap.db'}"
    engine = make_orders(url, 0)
    try:
        add_orders(engine, 1, start=1, when=datetime(2024, 3, 31, 2, 30))  # wall time that never happened
        add_orders(engine, 1, start=2, when=datetime(2024, 3, 31, 3, 10))  # a real CEST time after it
        r = _runner(sqlite_store, url, batch_size=1, naive_timezone="Europe/Berlin")
        _drain(r)
        assert sorted(_keys(sqlite_store)) == [1, 2]
    finally:
        engine.dispose()
