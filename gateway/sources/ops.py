"""Operating sources from any process: the logic shared by ``gateway sources ...`` and ``/v1/sources``.

Both front ends call these functions, so a source's status, a cursor preview and a cursor move
mean exactly the same thing in the CLI and in the REST API:

* :func:`source_view` / :func:`source_views`: a source's status as one JSON-safe dict (state,
  desired state, breaker, counters, last poll, drift, cursor and its lag, lease, runners);
* :func:`pause`, :func:`resume`, :func:`run_now`: operator wishes written to the store, which the
  source's runner reads every ``status_interval``;
* :func:`preview_cursor_move` and :func:`apply_cursor_move`: a dry-run preview of a cursor move
  (rows read again or skipped, from the adapter's ``count_between``) and its application (a new
  fencing epoch and an audit-log entry).

Nothing here prints or exits: callers turn :class:`UnknownSourceError` into exit code 2 (CLI) or
a 404 problem (API).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.config import Settings, SourceSettings
from gateway.errors import ConfigurationError
from gateway.events import utcnow
from gateway.events.jsonsafe import jsonable
from gateway.events.timeutil import parse_time
from gateway.store import Actor, EventStore

__all__ = [
    "CursorPreview",
    "SourceNotRunnableError",
    "UnknownSourceError",
    "apply_cursor_move",
    "cursor_time",
    "lease_word",
    "pause",
    "preview_cursor_move",
    "resume",
    "resume_note",
    "run_now",
    "run_now_note",
    "runner_live",
    "source_settings",
    "source_view",
    "source_views",
]

log = logging.getLogger("gateway.sources")


class UnknownSourceError(LookupError):
    """No configured source has that name.

    Attributes:
        name: the name asked for.
        known: the configured names (for operators; the API does not show them).
    """

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown source {name!r} (known: {', '.join(known) or 'none'})")
        self.name = name
        self.known = known


def source_settings(settings: Settings, name: str) -> SourceSettings:
    """The configured source ``name``.

    Raises:
        UnknownSourceError: no source has that name.
    """
    try:
        return settings.source(name)
    except ConfigurationError:
        raise UnknownSourceError(name, [s.name for s in settings.sources]) from None


# ---------------------------------------------------------------------------- status
def lease_word(cursor: Any, now: datetime) -> str:
    """``live`` | ``expired`` | ``free`` for a source's lease (``-``: the source never ran)."""
    if cursor is None:
        return "-"
    if cursor.lease_owner is None:
        return "free"
    return "live" if cursor.lease_live(now) else "expired"


def runner_live(runner: Any, src: SourceSettings, now: datetime) -> bool:
    """Whether a runner heartbeat is recent: runners write at least every status_interval, or
    every lease_ttl/3 while standby."""
    return bool(runner.updated_at >= now - timedelta(seconds=max(3 * src.status_interval, src.lease_ttl)))


def cursor_time(cursor: Any) -> datetime | None:
    """The time a cursor stands at, when it has one: the ``ts`` member of a timestamp cursor
    (the SQL adapter's ``{"ts": ..., "key": ...}``); ``None`` otherwise."""
    if isinstance(cursor, dict) and isinstance(cursor.get("ts"), str):
        try:
            return parse_time(cursor["ts"])
        except (ValueError, TypeError):
            return None
    return None


def _view(
    src: SourceSettings, cursor: Any, status: Any, runners: list[Any], run_requested_at: datetime | None, now: datetime
) -> dict[str, Any]:
    item: dict[str, Any] = {"name": src.name, "adapter": src.adapter, "enabled": src.enabled}
    item.update(status.to_dict() if status else {"state": None})
    item.pop("source_name", None)
    item["drift_detected"] = bool(status and status.drift_detected)
    item["cursor"] = cursor.cursor if cursor else None
    at = cursor_time(item["cursor"])
    item["cursor_time"] = at
    item["lag_seconds"] = max(0.0, (now - at).total_seconds()) if at is not None else None
    item["events_total"] = cursor.events_total if cursor else 0
    item["cursor_updated_at"] = cursor.updated_at if cursor else None
    item["cursor_epoch"] = cursor.epoch if cursor else None
    item["lease"] = lease_word(cursor, now)
    item["lease_owner"] = cursor.lease_owner if cursor else None
    item["lease_until"] = cursor.lease_until if cursor else None
    item["run_requested_at"] = run_requested_at
    item["runners"] = [
        {"owner": r.owner, "state": r.state, "epoch": r.epoch, "updated_at": r.updated_at, "live": runner_live(r, src, now)}
        for r in runners
    ]
    out: dict[str, Any] = jsonable(item)
    return out


def source_views(
    settings: Settings, store: EventStore, names: set[str] | frozenset[str] | None = None, now: datetime | None = None
) -> list[dict[str, Any]]:
    """The status of every configured source (in configuration order), or of those in ``names``.

    Each item holds ``name``, ``adapter``, ``enabled``, the persisted runner status (``state`` --
    ``None`` before any runner reported --, ``desired_state``, ``last_poll_at``, ``last_error``,
    counters, ``breaker``, ``drift``...), ``drift_detected``, ``cursor``,
    ``cursor_time`` and ``lag_seconds`` (now minus the cursor's time, ``None`` when the cursor has
    no time), ``events_total``, ``cursor_updated_at``, ``cursor_epoch``, ``lease`` (``live``,
    ``expired``, ``free`` or ``-``), ``lease_owner``, ``lease_until``, ``run_requested_at`` (the last
    "run now" wish) and ``runners``.

    Raises:
        StoreUnavailableError: the store could not be read.
    """
    cursors = {c.source_name: c for c in store.list_cursors()}
    statuses = {s.source_name: s for s in store.list_source_status()}
    runners: dict[str, list[Any]] = {}
    for r in store.list_runners():
        runners.setdefault(r.source_name, []).append(r)
    runs = store.list_run_requests()
    at = now if now is not None else utcnow()
    return [
        _view(src, cursors.get(src.name), statuses.get(src.name), runners.get(src.name, []), runs.get(src.name), at)
        for src in settings.sources
        if names is None or src.name in names
    ]


def source_view(settings: Settings, store: EventStore, name: str, now: datetime | None = None) -> dict[str, Any]:
    """The status of source ``name``, as an item of :func:`source_views`.

    Raises:
        UnknownSourceError: no source has that name.
    """
    src = source_settings(settings, name)
    return _view(src, store.get_cursor(name), store.get_source_status(name), store.list_runners(name),
                 store.get_run_request(name), now if now is not None else utcnow())


# ---------------------------------------------------------------------------- operator wishes
def pause(settings: Settings, store: EventStore, name: str) -> Any:
    """Ask the source's runner to stop polling (state ``paused-by-operator`` within its
    ``status_interval``) until resumed. Returns the status row after the change.

    Raises:
        UnknownSourceError: no source has that name.
    """
    source_settings(settings, name)
    return store.set_source_desired_state(name, "paused")


def resume(settings: Settings, store: EventStore, name: str) -> tuple[Any, Any]:
    """Let a paused, failed or drift-stopped source poll again. Returns the status rows
    (before, after): ``before.state`` tells what the runner was doing.

    Raises:
        UnknownSourceError: no source has that name.
    """
    source_settings(settings, name)
    before = store.get_source_status(name)
    return before, store.set_source_desired_state(name, "running")


#: Runner states in which a "run now" cannot make the source poll: an operator must resume it.
_NOT_RUNNABLE = ("paused-by-operator", "failed", "drift-stopped")


class SourceNotRunnableError(RuntimeError):
    """A "run now" was asked of a source that is paused, failed or drift-stopped (resume it instead)."""


def run_now(settings: Settings, store: EventStore, name: str, requested_by: str | None = None) -> Any:
    """Ask the source's runner to poll at once instead of waiting for the rest of its interval
    (it sees the wish at its next operator check, within ``status_interval``; it also cuts a
    transient-error backoff short, but never an open circuit breaker's pause). Returns the
    source's status row (``None`` when no runner ever reported).

    Raises:
        UnknownSourceError: no source has that name.
        SourceNotRunnableError: the source is paused by an operator (or a pause is pending), or
            stopped after a permanent failure or schema drift; nothing is recorded.
    """
    src = source_settings(settings, name)
    row = store.get_source_status(name)
    if row is not None and (row.desired_state == "paused" or row.state in _NOT_RUNNABLE):
        why = "paused by an operator" if row.desired_state == "paused" else f"in state {row.state}"
        raise SourceNotRunnableError(
            f"source {name!r} is {why}: a run now does not lift that; resume it (POST /v1/sources/{name}/resume "
            f"or `gateway sources resume {name}`), which polls at once"
        )
    del src
    store.request_source_run(name, requested_by)
    return store.get_source_status(name)


def run_now_note(row: Any, src: SourceSettings) -> str:
    """What happens after :func:`run_now`, in one sentence."""
    if row is None or row.state in (None, "unknown"):
        return ("run requested; no runner has reported for this source yet: the first runner to take its lease "
                "polls at once anyway")
    if row.state == "standby":
        return "run requested; no runner holds the lease right now: the next holder polls at once"
    return f"run requested; its runner polls within {src.status_interval:g} s (state {row.state})"


def resume_note(state: str | None) -> str:
    """What a resume does for a source in ``state`` (empty when nothing to add)."""
    if state == "failed":
        return "It retries the read that failed; if the error repeats it stops again (no second dead letter)."
    if state == "drift-stopped":
        return "The drift stays reported; `gateway sources accept-drift` makes it the new baseline."
    return ""


# ---------------------------------------------------------------------------- cursor moves
@dataclass(frozen=True, slots=True)
class CursorPreview:
    """What moving a source's cursor would do.

    Attributes:
        source: the source name.
        reset: the move goes back to the adapter's initial cursor.
        before: the committed cursor (the adapter's initial cursor when none is committed).
        after: the cursor after the move.
        epoch: the committed fencing epoch (0 when the source never ran).
        rows_read_again: rows the source would read again (``count_between(after, before)``);
            ``None`` when unknown.
        rows_skipped: rows it would never read (``count_between(before, after)``); ``None`` when unknown.
        unknown_reason: why the counts are unknown (the adapter could not open, or cannot count),
            ``None`` when they are known.
    """

    source: str
    reset: bool
    before: Any
    after: Any
    epoch: int
    rows_read_again: int | None
    rows_skipped: int | None
    unknown_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        out: dict[str, Any] = jsonable({
            "source": self.source, "reset": self.reset, "before": self.before, "after": self.after,
            "epoch": self.epoch, "rows_read_again": self.rows_read_again, "rows_skipped": self.rows_skipped,
            "unknown_reason": self.unknown_reason,
        })
        return out


def _count(adapter: Any, after: Any, upto: Any) -> int | None:
    """``adapter.count_between(after, upto)``; ``None`` when it cannot tell or fails."""
    try:
        n = adapter.count_between(after, upto)
    except Exception as exc:  # noqa: BLE001 -- a preview must not fail on the count
        log.warning("count_between failed: %s: %s", type(exc).__name__, exc)
        return None
    return int(n) if n is not None else None


def preview_cursor_move(settings: Settings, store: EventStore, name: str, target: Any = None, *, reset: bool = False) -> CursorPreview:
    """Preview moving source ``name``'s cursor to ``target`` (or back to the adapter's initial
    cursor with ``reset``); changes nothing.

    The adapter is built and opened to count the rows between the cursors; when it cannot be
    opened, the counts are unknown and ``unknown_reason`` says why (the move itself needs no
    source connection).

    Raises:
        UnknownSourceError: no source has that name.
        ConfigurationError: the source's adapter cannot be built from its configuration.
    """
    from pydantic import ValidationError

    from gateway.sources import (
        runner as runner_module,  # looked up at call time (tests swap build_adapter)
    )

    src = source_settings(settings, name)
    state = store.get_cursor(name)
    try:
        adapter = runner_module.build_adapter(src)
    except (ConfigurationError, ValidationError) as exc:
        raise ConfigurationError(f"source {name!r}: {exc}") from None
    opened, why = False, ""
    try:
        adapter.open()
        opened = True
    except Exception as exc:  # noqa: BLE001 -- the preview says so; the move itself needs no source
        why = f"{type(adapter.classify_error(exc)).__name__}: {exc}"
    try:
        if reset:
            target = adapter.initial_cursor()
        before = state.cursor if state is not None and state.cursor is not None else adapter.initial_cursor()
        reread: int | None = 0
        skipped: int | None = 0
        if opened:
            # A cursor of None is the beginning: nothing before it to skip, nothing read yet after it.
            if before is not None:
                reread = _count(adapter, target, before)
            if target is not None:
                skipped = _count(adapter, before, target)
        else:
            reread = skipped = None
    finally:
        adapter.close()
    reason = None
    if reread is None or skipped is None:
        reason = why or "the adapter cannot count"
    return CursorPreview(name, reset, before, target, state.epoch if state is not None else 0, reread, skipped, reason)


def apply_cursor_move(store: EventStore, preview: CursorPreview, actor: Actor) -> int:
    """Move the cursor as previewed: bump the source's fencing epoch (a running runner is fenced
    and continues from the new cursor) and write the audit log (``source.cursor.set`` or
    ``source.cursor.reset``; a failure to write it is only logged).

    Returns:
        The new epoch.

    Raises:
        StoreUnavailableError: the move did not commit.
    """
    new_epoch: int = store.set_cursor(preview.source, preview.after)
    try:
        store.record_audit(
            actor, "source.cursor.reset" if preview.reset else "source.cursor.set", preview.source,
            {"before": preview.before, "after": preview.after, "epoch": new_epoch},
        )
    except Exception as exc:  # noqa: BLE001 -- the move is done; the audit gap is logged
        log.warning("could not write the audit log for the cursor move of %r: %s", preview.source, exc)
    return new_epoch
