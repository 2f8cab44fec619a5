"""`gateway sources cursor`: show the committed cursor, epoch and lease; preview and apply moves."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from adapters.base import Batch, PollingSource, SourceConfig
from gateway.cli import app
from gateway.config import load_settings
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore, make_engine
from gateway.store.migrate import upgrade
from tests.legacy import add_orders, make_orders, source_settings

cli = CliRunner()


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[tuple[Path, EventStore, SourceRunner]]:
    """Sources ``orders`` (5 legacy rows, polled once by a runner that still holds the lease) and
    ``spare`` (never ran), with their SQLite store."""
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 5).dispose()
    cfg = tmp_path / "g.yaml"
    sources = [{**source_settings(legacy), "lease_ttl": 0.6}, source_settings(legacy, name="spare")]
    cfg.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'g.db'}"}, "sources": sources}))
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(engine)
    store = EventStore(engine)
    runner = SourceRunner(load_settings(cfg).sources[0], store, owner="host-a:42:r1")
    runner.run_once()
    yield cfg, store, runner
    runner.adapter.close()
    engine.dispose()


def invoke(*args: str) -> Any:
    return cli.invoke(app, list(args))


class CountingSource(PollingSource[SourceConfig]):
    """An adapter that counts rows between cursors with ``count(after, upto)``; never fetches."""

    kind = "counting"

    def __init__(self, count: Callable[[Any, Any], int | None] | None, *, initial: Any = None) -> None:
        super().__init__(SourceConfig(), source_name="orders")
        self.count = count
        self.initial = initial
        self.asked: list[tuple[Any, Any]] = []
        self.opened = self.closed = False

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.closed = True

    def initial_cursor(self) -> Any:
        return self.initial

    def fetch(self, cursor: Any, limit: int) -> Batch:
        raise AssertionError("a preview never reads the source")

    def count_between(self, after: Any, upto: Any) -> int | None:
        self.asked.append((after, upto))
        return self.count(after, upto) if self.count else None


def use_adapter(monkeypatch: pytest.MonkeyPatch, adapter: PollingSource) -> None:  # type: ignore[type-arg]
    monkeypatch.setattr("gateway.sources.runner.build_adapter", lambda settings: adapter)


def test_show_prints_the_cursor_epoch_and_lease(ops: tuple[Path, EventStore, SourceRunner]) -> None:
    cfg, store, _ = ops
    result = invoke("sources", "cursor", "orders", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    committed = store.get_cursor("orders")
    assert committed is not None
    lines = result.output.splitlines()
    assert lines[0] == "source 'orders'"
    assert lines[1] == f"  cursor:    {json.dumps(committed.cursor, separators=(',', ':'))}"
    assert "(5 events in total)" in lines[2] and lines[3] == "  epoch:     1"
    assert lines[4].startswith("  lease:     held by host-a:42:r1 until ") and lines[4].endswith("s left)")
    never = invoke("sources", "cursor", "spare", "-c", str(cfg))
    assert never.exit_code == 0 and "none committed" in never.output and "free (the source never ran)" in never.output


def test_set_prints_a_dry_run_preview_and_changes_nothing(ops: tuple[Path, EventStore, SourceRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, store, _ = ops
    before = store.get_cursor("orders")
    assert before is not None
    target = {"ts": "2024-01-01T12:00:00.002000Z", "key": 2}
    adapter = CountingSource(lambda after, upto: 3 if (after, upto) == (target, before.cursor) else 0)
    use_adapter(monkeypatch, adapter)
    result = invoke("sources", "cursor", "orders", "-c", str(cfg), "--set", json.dumps(target))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dry run, nothing changed" in out and "Run again with --yes to apply." in out
    assert f"now:    {json.dumps(before.cursor, separators=(',', ':'))}  (epoch 1)" in out
    assert f"after:  {json.dumps(target, separators=(',', ':'))}" in out
    assert "rows read again: 3" in out and "rows skipped:    0" in out
    assert adapter.asked == [(target, before.cursor), (before.cursor, target)] and adapter.opened and adapter.closed
    assert store.get_cursor("orders") == before  # nothing changed: cursor, epoch, lease


def test_a_move_forward_counts_skipped_rows_and_unknown_counts_say_so(ops: tuple[Path, EventStore, SourceRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, store, _ = ops
    before = store.get_cursor("orders")
    assert before is not None
    ahead = {"key": 99}
    use_adapter(monkeypatch, CountingSource(lambda after, upto: 7 if (after, upto) == (before.cursor, ahead) else 0))
    out = invoke("sources", "cursor", "orders", "-c", str(cfg), "--set", json.dumps(ahead)).output
    assert "rows read again: 0" in out and "rows skipped:    7" in out
    use_adapter(monkeypatch, CountingSource(None))  # the default hook: cannot tell
    out = invoke("sources", "cursor", "orders", "-c", str(cfg), "--set", json.dumps(ahead)).output
    assert "rows read again: unknown (the adapter cannot count)" in out and "rows skipped:    unknown" in out


def test_reset_previews_the_initial_cursor(ops: tuple[Path, EventStore, SourceRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, store, _ = ops
    before = store.get_cursor("orders")
    assert before is not None
    adapter = CountingSource(lambda after, upto: 5 if after is None else 0)
    use_adapter(monkeypatch, adapter)
    result = invoke("sources", "cursor", "orders", "-c", str(cfg), "--reset")
    assert result.exit_code == 0, result.output
    assert "after:  null  (the adapter's initial cursor)" in result.output
    assert "rows read again: 5" in result.output and "rows skipped:    0" in result.output
    assert adapter.asked == [(None, before.cursor)]  # nothing lies before the beginning: no skip count asked
    assert store.get_cursor("orders") == before


def test_yes_applies_the_move_with_a_new_epoch_and_logs_it(
    ops: tuple[Path, EventStore, SourceRunner], caplog: pytest.LogCaptureFixture
) -> None:
    cfg, store, runner = ops
    before = store.get_cursor("orders")
    assert before is not None
    with caplog.at_level(logging.WARNING, logger="gateway"):
        result = invoke("sources", "cursor", "orders", "-c", str(cfg), "--reset", "--yes")
    assert result.exit_code == 0, result.output
    assert "dry run" not in result.output and "applied: epoch 2" in result.output
    assert "rows read again: 5" in result.output  # the SQL adapter's count of the 5 legacy rows
    after = store.get_cursor("orders")
    assert after is not None and after.cursor is None and after.epoch == 2
    assert after.lease_owner == "host-a:42:r1"  # the lease stays; its holder is fenced by the epoch
    moved = [r.getMessage() for r in caplog.records if "cursor moved by an operator" in r.getMessage()]
    assert len(moved) == 1 and "'orders'" in moved[0] and "-> null; epoch 1 -> 2" in moved[0]
    assert not store.renew_lease("orders", runner.owner, 1, 30)  # the running runner has lost epoch 1


def test_the_sql_adapter_counts_the_preview_exactly(ops: tuple[Path, EventStore, SourceRunner]) -> None:
    """No stand-in adapter: the configured ``sql`` source counts the rows a move would re-read or skip."""
    cfg, store, _ = ops
    before = store.get_cursor("orders")
    assert before is not None and before.cursor == {"ts": "2024-01-01T12:00:00.005000Z", "key": 5}
    legacy = make_engine(f"sqlite:///{cfg.parent / 'legacy.db'}")
    add_orders(legacy, 4, start=6)  # rows 6..9, one millisecond apart, not read yet
    legacy.dispose()
    back = invoke("sources", "cursor", "orders", "-c", str(cfg), "--set", '{"ts":"2024-01-01T12:00:00.002000Z","key":2}')
    assert back.exit_code == 0, back.output
    assert "rows read again: 3" in back.output and "rows skipped:    0" in back.output  # rows 3, 4, 5
    ahead = invoke("sources", "cursor", "orders", "-c", str(cfg), "--set", '{"ts":"2024-01-01T12:00:00.008000Z","key":8}')
    assert "rows read again: 0" in ahead.output and "rows skipped:    3" in ahead.output  # rows 6, 7, 8
    reset = invoke("sources", "cursor", "orders", "-c", str(cfg), "--reset")
    assert "rows read again: 5" in reset.output and "dry run, nothing changed" in reset.output
    assert store.get_cursor("orders") == before  # previews change nothing


def test_a_running_runner_re_reads_from_the_moved_cursor_instead_of_overwriting_it(ops: tuple[Path, EventStore, SourceRunner]) -> None:
    cfg, store, old = ops
    old.close()  # the fixture's runner stops; a live one (lease_ttl 0.6 s) takes its place
    end = store.get_cursor("orders").cursor  # type: ignore[union-attr]
    runner = SourceRunner(load_settings(cfg).sources[0], store, owner="host-b:7:r2")
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while runner.status.state != "idle" and time.monotonic() < deadline:
            time.sleep(0.01)
        result = invoke("sources", "cursor", "orders", "-c", str(cfg), "--reset", "--yes")
        assert result.exit_code == 0, result.output
        deadline = time.monotonic() + 5
        while runner.status.duplicates < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(5)
    # Within ttl/3 it noticed the new epoch, kept the lease, reloaded the cursor and read all 5 again.
    assert runner.status.duplicates == 5 and store.stats()["events"] == 5
    cur = store.get_cursor("orders")
    assert cur is not None and cur.epoch == 3 and cur.cursor == end  # 2: its take-over


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["orders", "--set", "{key: 1"], "--set: not valid JSON"),
        (["nope", "--set", "1"], "unknown source 'nope' (known: orders, spare)"),
        (["nope"], "unknown source 'nope' (known: orders, spare)"),
        (["orders", "--set", "1", "--reset"], "either --set JSON or --reset, not both"),
        (["orders", "--yes"], "--yes applies a move: give --set JSON or --reset"),
    ],
)
def test_bad_arguments_exit_2(ops: tuple[Path, EventStore, SourceRunner], args: list[str], message: str) -> None:
    cfg, store, _ = ops
    before = store.get_cursor("orders")
    result = invoke("sources", "cursor", *args, "-c", str(cfg))
    assert result.exit_code == 2 and message in result.output, result.output
    assert store.get_cursor("orders") == before


def test_sources_list_shows_the_lease_and_the_standby_runners(ops: tuple[Path, EventStore, SourceRunner]) -> None:
    cfg, store, holder = ops
    standby = SourceRunner(load_settings(cfg).sources[0], store, owner="host-b:7:r2")

    def wait(stop: threading.Event, seconds: float) -> bool:
        stop.set()  # one standby round is enough
        return True

    standby._wait = wait
    standby._standby(threading.Event())  # finds the lease held: reports standby
    assert standby.status.state == "standby" and standby.status.lease_holder == holder.owner
    line = next(ln for ln in invoke("sources", "list", "-c", str(cfg)).output.splitlines() if ln.startswith("orders"))
    assert line.split()[3] == "idle" and line.split()[-3:] == ["live", "1", "-"]
    (item, spare) = json.loads(invoke("sources", "list", "-c", str(cfg), "--json").output)
    assert item["lease"] == "live" and item["lease_owner"] == holder.owner and item["lease_until"].endswith("Z")
    assert item["cursor_epoch"] == 1 and item["owner"] == holder.owner and item["state"] == "idle"
    assert [(r["owner"], r["state"], r["epoch"], r["live"]) for r in item["runners"]] == [
        ("host-a:42:r1", "idle", 1, True), ("host-b:7:r2", "standby", None, True),
    ]
    assert spare["lease"] == "-" and spare["runners"] == [] and spare["lease_owner"] is None
