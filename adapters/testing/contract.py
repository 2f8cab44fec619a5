"""``AdapterContract``: the standard checks every adapter plugin should pass.

Subclass it in a test module (the class name must start with ``Test``), set
:attr:`~AdapterContract.adapter_class` and :attr:`~AdapterContract.mapping`, and implement the
hooks. The required hooks are :meth:`~AdapterContract.valid_config` and
:meth:`~AdapterContract.add_records`; checks whose optional hook you do not provide are skipped
with a reason that names the hook. Start the backing system (a temp folder, a simulator, a
container) in your own fixture, usually an ``autouse`` one on the subclass: hooks are only called
inside the checks, after your fixtures ran.

Every check uses fresh adapter instances, a private SQLite gateway store and, where it says so, a
real :class:`~gateway.sources.runner.SourceRunner`, exactly as the gateway drives a source.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from adapters.base import Batch, PollingSource
from adapters.testing.harness import ContractHarness, json_round_trip, parse_cloudevent, read_all, threads_settled
from gateway.errors import ConfigurationError, GatewayError, PermanentError, TransientError

__all__ = ["AdapterContract"]


class _SimulatedCrash(BaseException):
    """Stands for the process dying inside the outbox commit (not an ``Exception``: nothing catches it)."""


class AdapterContract:
    """Base class of an adapter's standard test suite.

    Class attributes:
        adapter_class: the :class:`~adapters.base.PollingSource` subclass under test (required).
        mapping: the ``mapping:`` block of the test source (required): ``type``, ``entity``,
            ``key`` and, when records have versions, ``version``. The key must identify a record.
        record_count: records the checks add to the backing system.
        batch_size: ``limit`` of every fetch; smaller than ``record_count`` so that reads take
            several batches.
        is_queue: ``True`` for adapters that consume (the backing system forgets what was
            committed, like a queue) rather than read by cursor. Default: ``dry_run_redelivers``
            of the adapter class.
    """

    adapter_class: ClassVar[type[PollingSource]]  # type: ignore[type-arg]
    mapping: ClassVar[Mapping[str, Any]]
    record_count: ClassVar[int] = 7
    batch_size: ClassVar[int] = 3
    is_queue: ClassVar[bool | None] = None

    # ------------------------------------------------------------------ hooks
    def valid_config(self) -> dict[str, Any]:
        """The ``config:`` block of a source that reads the backing system (required).

        Do not set ``batch_size``: the suite sets it from :attr:`batch_size`.
        """
        raise NotImplementedError(f"{type(self).__name__}: implement valid_config()")

    def invalid_configs(self) -> list[tuple[dict[str, Any], str]]:
        """Broken ``config:`` blocks, each with the field name the error must mention.

        The default is the valid block plus an unknown key. Override to add your own rules, for
        example ``[({**self.valid_config(), "port": -1}, "port")]``.
        """
        return [({**self.valid_config(), "no_such_option": 1}, "no_such_option")]

    def unreachable_config(self) -> dict[str, Any] | None:
        """A valid block whose system is not there (wrong host, missing folder); ``None`` skips the check."""
        return None

    def add_records(self, n: int) -> None:
        """Add ``n`` new records to the backing system, after every record added before (required)."""
        raise NotImplementedError(f"{type(self).__name__}: implement add_records(n)")

    def update_record(self) -> None:
        """Change one record already added, so that it is read again as a new version.

        Not implemented: the update check is skipped (for example for a queue, or an append-only
        file).
        """
        raise NotImplementedError

    def transient_failure(self) -> AbstractContextManager[Any]:
        """A context manager inside which ``fetch`` fails the way a passing outage fails.

        On exit the system works again. Not implemented: the check is skipped.
        """
        raise NotImplementedError

    def permanent_failure(self) -> AbstractContextManager[Any]:
        """A context manager inside which ``fetch`` fails in a way a retry cannot fix.

        On exit the system works again. Not implemented: the check is skipped.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ plumbing
    harness: ContractHarness

    @pytest.fixture(autouse=True)
    def _contract_harness(self, tmp_path: Path) -> Iterator[ContractHarness]:
        self.harness = ContractHarness(self.adapter_class, self.mapping, tmp_path)
        yield self.harness
        self.harness.close()

    def _config(self) -> dict[str, Any]:
        return {**self.valid_config(), "batch_size": self.batch_size}

    def _queue(self) -> bool:
        return self.adapter_class.dry_run_redelivers if self.is_queue is None else self.is_queue

    def _opened(self) -> PollingSource:  # type: ignore[type-arg]
        adapter = self.harness.adapter(self._config())
        adapter.open()
        return adapter

    def _ids(self, batches: list[Batch]) -> list[str]:
        mapper = self.harness.mapper()
        return [mapper.to_event(r).id for b in batches for r in b.records]

    @staticmethod
    def _hand_back(adapter: PollingSource, batches: list[Batch]) -> None:  # type: ignore[type-arg]
        for batch in batches:
            adapter.released(batch)

    @staticmethod
    def _skip_unless(hook: Any, name: str) -> Any:
        try:
            return hook()
        except NotImplementedError:
            pytest.skip(f"hook {name}() not provided")

    # ------------------------------------------------------------------ configuration
    def test_config_model_describes_every_field(self) -> None:
        """Every config field has a description (it is the user's reference) and the model renders as JSON schema."""
        model = self.adapter_class.config_model
        missing = [name for name, f in model.model_fields.items() if not f.description]
        assert not missing, f"{model.__name__}: fields without description: {missing}"
        assert model.model_json_schema()["properties"]

    def test_valid_config_parses(self) -> None:
        """The valid block parses into the adapter's own config model and builds an adapter."""
        config = self.adapter_class.parse_config(self._config())
        assert isinstance(config, self.adapter_class.config_model)
        assert config.batch_size == self.batch_size
        adapter = self.harness.adapter(self._config())
        assert adapter.source_name == self.harness.source_name and adapter.config == config

    def test_invalid_config_names_the_field(self) -> None:
        """Each broken block is refused with a ValidationError or ConfigurationError naming its field."""
        cases = self.invalid_configs()
        assert cases, "invalid_configs() returned no cases"
        for raw, field in cases:
            with pytest.raises((ValidationError, ConfigurationError)) as info:
                self.harness.adapter(raw).open()
            exc = info.value
            if isinstance(exc, ValidationError):
                where = [".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in exc.errors()]
                assert any(field in w for w in where), f"the error does not name {field!r}: {where}"
            else:
                assert field in str(exc), f"the error does not name {field!r}: {exc}"

    def test_check_passes_against_the_live_system(self) -> None:
        """``check()`` (used by ``gateway check --connect``) succeeds, and ``close()`` may follow twice."""
        adapter = self.harness.adapter(self._config())
        adapter.check()
        adapter.close()
        adapter.close()

    def test_check_reports_an_unreachable_system(self) -> None:
        """``check()`` against a system that is not there raises a GatewayError (reported, not a crash)."""
        raw = self.unreachable_config()
        if raw is None:
            pytest.skip("hook unreachable_config() not provided")
        adapter = self.harness.adapter({**raw, "batch_size": self.batch_size})
        with pytest.raises(GatewayError):
            adapter.check()
        adapter.close()

    # ------------------------------------------------------------------ events
    def test_events_are_valid_cloudevents(self) -> None:
        """Every record maps to an event that the official CloudEvents SDK parses, with the lineage extensions."""
        self.add_records(self.record_count)
        adapter = self._opened()
        batches = read_all(adapter, adapter.initial_cursor(), self.batch_size)
        records = [r for b in batches for r in b.records]
        assert len(records) == self.record_count
        mapper = self.harness.mapper()
        for record in records:
            event = mapper.to_event(record)
            parsed = parse_cloudevent(event)
            assert parsed.get_specversion() == "1.0"
            assert parsed.get_id() == event.id
            assert parsed.get_source() == f"/legacy-gateway/sources/{self.harness.source_name}"
            assert parsed.get_type().startswith(self.mapping["type"])
            assert parsed.get_extension("sourcename") == self.harness.source_name
            assert parsed.get_extension("sourceadapter") == self.adapter_class.kind
            assert json.loads(parsed.get_extension("sourceposition")) == json_round_trip(record.position)
            assert isinstance(parsed.get_data(), dict)
        self._hand_back(adapter, batches)

    def test_ids_are_deterministic(self) -> None:
        """Two adapters reading the same data give the same event ids, one per record."""
        self.add_records(self.record_count)
        first = self._opened()
        batches = read_all(first, first.initial_cursor(), self.batch_size)
        ids_first = self._ids(batches)
        self._hand_back(first, batches)
        first.close()
        second = self._opened()
        again = read_all(second, second.initial_cursor(), self.batch_size)
        ids_second = self._ids(again)
        self._hand_back(second, again)
        assert len(set(ids_first)) == self.record_count, "the mapping key must identify a record"
        assert Counter(ids_second) == Counter(ids_first)

    # ------------------------------------------------------------------ cursors
    def test_cursor_is_json_safe_and_monotonic(self) -> None:
        """Cursors and positions are JSON-safe, batches respect ``limit``, no cursor goes back, an idle poll keeps the cursor."""
        self.add_records(self.record_count)
        adapter = self._opened()
        cursor = adapter.initial_cursor()
        json_round_trip(cursor)
        seen: set[str] = set()
        mapper = self.harness.mapper()
        for _ in range(self.record_count + 2):
            batch = adapter.fetch(cursor, self.batch_size)
            assert len(batch.records) <= self.batch_size, "a batch exceeds limit"
            assert json_round_trip(batch.cursor) == batch.cursor, "the cursor is not JSON-safe"
            if not batch.records:
                assert batch.cursor == cursor, "an empty batch must return the cursor it was given"
                assert not batch.has_more
                break
            for record in batch.records:
                json_round_trip(record.position)
                event_id = mapper.to_event(record).id
                assert event_id not in seen, f"record at {record.position!r} read again after its cursor"
                seen.add(event_id)
            adapter.committed(batch)  # as the runner does after the commit (a queue acks)
            cursor = batch.cursor
        else:
            raise AssertionError("the adapter never returned an empty batch")
        assert len(seen) == self.record_count
        adapter.close()  # a consumer would otherwise take the new records below
        # New records appear after the last cursor: the cursor did not skip ahead.
        self.add_records(2)
        fresh = self._opened()
        tail = read_all(fresh, cursor, self.batch_size)
        assert sum(len(b.records) for b in tail) == 2
        for batch in tail:
            fresh.committed(batch)

    def test_resume_after_a_crash_mid_batch(self) -> None:
        """A process dying after a fetch, before its commit, loses nothing: a new adapter from the committed cursor reads the rest."""
        self.add_records(self.record_count)
        config = self._config()
        runner = self.harness.runner(config)
        committed = runner.run_once()
        assert committed.records
        crashed = runner.adapter
        state = self.harness.store.get_cursor(self.harness.source_name)
        assert state is not None
        in_flight = crashed.fetch(state.cursor, self.batch_size)  # read, then the process dies
        assert in_flight.records
        crashed.close()  # the dying process's connections drop; nothing was committed or released
        restarted = self.harness.runner(config)  # same owner: the restarted process takes its lease back
        read_after = sum(len(b.records) for b in self.harness.drain(restarted))
        restarted.close()
        ids = self.harness.stored_ids()
        assert len(ids) == self.record_count and len(set(ids)) == self.record_count
        assert len(committed.records) + read_after == self.record_count, "records were read twice after the restart"

    def test_a_batch_whose_commit_fails_is_read_again(self) -> None:
        """When the outbox commit fails the runner calls ``released()``; the next poll reads the same records."""
        self.add_records(self.record_count)
        runner = self.harness.runner(self._config())
        store = runner.store
        real_accept = store.accept

        def crash(*args: Any, **kwargs: Any) -> Any:
            raise _SimulatedCrash("the outbox commit died")

        store.accept = crash  # type: ignore[method-assign]
        with pytest.raises(_SimulatedCrash):
            runner.run_once()
        store.accept = real_accept  # type: ignore[method-assign]
        assert self.harness.stored_ids() == []
        self.harness.drain(runner)
        runner.close()
        ids = self.harness.stored_ids()
        assert len(ids) == self.record_count == len(set(ids))

    def test_no_loss_or_duplication_across_a_restart(self) -> None:
        """A runner stopped between batches and a new one on the same store read every record exactly once."""
        self.add_records(self.record_count)
        config = self._config()
        first = self.harness.runner(config, owner="replica-1")
        reads = len(first.run_once().records)
        first.close()  # graceful stop: releases the lease
        self.add_records(2)
        second = self.harness.runner(config, owner="replica-2")
        reads += sum(len(b.records) for b in self.harness.drain(second))
        second.close()
        third = self.harness.runner(config, owner="replica-3")
        reads += sum(len(b.records) for b in self.harness.drain(third))
        third.close()
        total = self.record_count + 2
        ids = self.harness.stored_ids()
        assert len(ids) == total == len(set(ids))
        assert reads == total, f"{reads} records read for {total} in the source"

    def test_an_updated_record_becomes_a_new_event(self) -> None:
        """After an update, the next poll reads just that record again, with a new event id."""
        self.add_records(self.record_count)
        runner = self.harness.runner(self._config())
        self.harness.drain(runner)
        before = set(self.harness.stored_ids())
        self._skip_unless(self.update_record, "update_record")
        again = self.harness.drain(runner)
        runner.close()
        assert sum(len(b.records) for b in again) == 1
        after = set(self.harness.stored_ids())
        assert before < after and len(after - before) == 1

    # ------------------------------------------------------------------ errors
    def _failure_check(self, hook: Any, name: str, expected: type[GatewayError]) -> None:
        self.add_records(self.record_count)
        adapter = self._opened()
        cursor = adapter.initial_cursor()
        failure = self._skip_unless(hook, name)
        with failure:
            with pytest.raises(Exception) as info:
                adapter.fetch(cursor, self.batch_size)
        classified = adapter.classify_error(info.value)
        assert isinstance(classified, expected), f"{type(info.value).__name__}: {info.value} classified as {type(classified).__name__}"
        if expected is PermanentError:
            assert not isinstance(classified, TransientError)
        # The system works again: the same adapter recovers from the same cursor.
        batches = read_all(adapter, cursor, self.batch_size)
        assert sum(len(b.records) for b in batches) == self.record_count
        self._hand_back(adapter, batches)

    def test_transient_failure_is_classified_transient(self) -> None:
        """``classify_error`` maps an outage to TransientError (retried), and the adapter recovers."""
        self._failure_check(self.transient_failure, "transient_failure", TransientError)

    def test_permanent_failure_is_classified_permanent(self) -> None:
        """``classify_error`` maps a failure no retry fixes to PermanentError (dead letter, source failed)."""
        self._failure_check(self.permanent_failure, "permanent_failure", PermanentError)

    # ------------------------------------------------------------------ stopping
    def test_close_is_idempotent_and_holds_nothing(self) -> None:
        """``close()`` before open, after open and mid-read (after ``released()``) is safe and leaves nothing held."""
        self.add_records(self.record_count)
        before = set(threading.enumerate())
        idle = self.harness.adapter(self._config())
        idle.close()  # never opened
        opened = self._opened()
        opened.close()
        opened.close()
        reading = self._opened()
        batch = reading.fetch(reading.initial_cursor(), self.batch_size)
        assert batch.records
        reading.released(batch)  # the batch could not be committed: hand back what it holds
        reading.close()
        reading.close()
        leaked = threads_settled(before)
        assert not leaked, f"threads still running after close(): {leaked}"
        # Nothing stayed held: a new adapter reads every record.
        fresh = self._opened()
        batches = read_all(fresh, fresh.initial_cursor(), self.batch_size)
        assert sum(len(b.records) for b in batches) == self.record_count
        self._hand_back(fresh, batches)
