"""The ``gateway`` command."""

from __future__ import annotations

import logging
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from gateway.config import Settings, format_validation_error, load_settings
from gateway.errors import ConfigurationError, GatewayError

app = typer.Typer(help="legacy-gateway: legacy systems to CloudEvents, RabbitMQ and AI scoring.", no_args_is_help=True)
db_app = typer.Typer(help="Gateway store migrations.", no_args_is_help=True)
sources_app = typer.Typer(help="Configured sources.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(sources_app, name="sources")
dead_app = typer.Typer(help="Dead letters: inspect, replay and delete what the gateway parked.", no_args_is_help=True)
app.add_typer(dead_app, name="dead-letters")
scoring_app = typer.Typer(help="Scoring: compare a shadow model with the primary.", no_args_is_help=True)
app.add_typer(scoring_app, name="scoring")

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML configuration file (default: $GATEWAY_CONFIG, else defaults + environment)."),
]
LogOpt = Annotated[str, typer.Option("--log-level", help="Logging level.")]

log = logging.getLogger("gateway")


_LOG_FORMAT = {"value": "auto"}


@app.callback()
def _main(
    log_format: Annotated[str, typer.Option(
        "--log-format", envvar="GATEWAY_LOG_FORMAT",
        help="Log lines as json (one object per line, with correlation ids) or text; auto: text on a terminal, "
        "json otherwise. Give it before the command: gateway --log-format json run.",
    )] = "auto",
) -> None:
    """legacy-gateway: legacy systems to CloudEvents, RabbitMQ and AI scoring."""
    if log_format not in ("auto", "json", "text"):
        _fail(f"--log-format: expected auto, json or text; got {log_format!r}")
    _LOG_FORMAT["value"] = log_format


def _setup_logging(level: str) -> None:
    """Root logging in the chosen format (gateway.observability.logs); secrets are redacted."""
    from gateway.observability.logs import configure_logging

    configure_logging(level, _LOG_FORMAT["value"], stream=sys.stderr)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigurationError as exc:
        _fail(str(exc))
        raise  # unreachable


_CONFIG_FIELD = re.compile(r"^source '[^']*': (config\.[A-Za-z0-9_.]+): (.*)$", re.S)


def validate_sources(settings: Settings, where: str, connect: bool = False) -> list[str]:
    """Validate each source's adapter config; returns error lines (empty when valid)."""
    from gateway.plugins import load_adapter
    from gateway.sources.mapping import Mapper

    errors: list[str] = []
    for i, src in enumerate(settings.sources):
        try:
            cls = load_adapter(src.adapter)
        except ConfigurationError as exc:
            errors.append(f"{where}: sources[{i}].adapter: {exc}")
            continue
        try:
            cfg = cls.parse_config(src.config)
        except ValidationError as exc:
            errors.extend(
                line.replace(f"{where}: ", f"{where}: sources[{i}].config.", 1).replace(".config.<root>", ".config")
                for line in format_validation_error(exc, where).splitlines()
            )
            continue
        if connect:
            adapter = cls(cfg, source_name=src.name)
            try:
                adapter.check()
                columns = getattr(adapter, "columns", None)
                if callable(columns):
                    missing = Mapper(src.mapping, src.name, cls.kind).required_fields() - set(columns())
                    if missing:
                        errors.append(
                            f"{where}: sources[{i}].mapping: field(s) {sorted(missing)} not produced by the "
                            f"source (available: {', '.join(columns())})"
                        )
            except GatewayError as exc:
                # "source 'x': config.table: ..." names the field: show it as a path, like validation errors.
                named = _CONFIG_FIELD.match(str(exc))
                errors.append(
                    f"{where}: sources[{i}].{named.group(1)}: {named.group(2)}" if named else f"{where}: sources[{i}]: {exc}"
                )
            finally:
                adapter.close()
    return errors


@app.command()
def check(
    config: ConfigOpt = None,
    connect: Annotated[bool, typer.Option(help="Also connect to each source and check names against it.")] = False,
) -> None:
    """Validate a configuration file; exit 0 when valid, 2 with precise errors otherwise."""
    settings = _settings(config)
    where = str(config) if config else "<environment>"
    errors = validate_sources(settings, where, connect=connect)
    if errors:
        typer.echo("\n".join(errors), err=True)
        raise typer.Exit(2)
    typer.echo(f"{where}: OK ({len(settings.sources)} source(s), bus: {'rabbitmq' if settings.bus.url else 'in-process'})")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None, revision: str = "head") -> None:
    """Migrate the gateway store to the latest (or the given) revision."""
    from gateway.store import engine_from_settings
    from gateway.store.migrate import current_revision, upgrade

    settings = _settings(config)
    engine = engine_from_settings(settings.store)
    upgrade(engine, revision)
    typer.echo(f"store at revision {current_revision(engine)}")
    engine.dispose()


def _source_store(settings: Settings) -> Any:
    """The store for the sources commands, migrated when ``store.auto_migrate`` (dispose its engine)."""
    from gateway.store import EventStore, engine_from_settings
    from gateway.store.migrate import upgrade

    engine = engine_from_settings(settings.store)
    if settings.store.auto_migrate:
        upgrade(engine)
    return EventStore(engine)


def _short(text: str | None, width: int) -> str:
    """One line of at most ``width`` characters (``-`` for none)."""
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "~"


def _stamp(value: Any) -> str:
    """A timestamp to the second, UTC (``-`` for none)."""
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


@sources_app.command("list")
def sources_list(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every source's full status as JSON.")] = False,
) -> None:
    """List configured sources with their state, breaker, events, last poll, drift, lease and last error.

    The state is what the source's lease holder last wrote to the store (any process); see
    docs/operations.md for the states, the lease and standby replicas. The same status is served by
    GET /v1/sources (gateway.sources.ops).
    """
    from gateway.events.jsonsafe import dumps
    from gateway.sources import ops

    settings = _settings(config)
    store = _source_store(settings)
    try:
        views = ops.source_views(settings, store)
    finally:
        store.engine.dispose()
    if as_json:
        typer.echo(dumps(views).decode())
        return
    typer.echo(
        f"{'NAME':24} {'ADAPTER':10} {'ENABLED':8} {'STATE':18} {'BREAKER':9} {'EVENTS':>8}  "
        f"{'LAST-POLL':20} {'DRIFT':5} {'LEASE':7} {'STANDBY':7} LAST-ERROR"
    )
    for v in views:
        reported = v["state"] is not None
        state = v["state"] if reported else "-"
        if reported and v["desired_state"] == "paused" and v["state"] != "paused-by-operator":
            state += "*"  # a pause was requested and not yet observed
        breaker = (v.get("breaker") or {}).get("state", "-") if reported else "-"
        drift = ("yes" if v["drift_detected"] else "no") if reported and v.get("fingerprint") else "-"
        standby = sum(1 for r in v["runners"] if r["state"] == "standby" and r["live"])
        last_poll = v["last_poll_at"][:19] + "Z" if reported and v.get("last_poll_at") else "-"
        typer.echo(
            f"{v['name']:24} {v['adapter']:10} {str(v['enabled']).lower():8} {state:18} {breaker:9} "
            f"{v['events_total']:>8}  {last_poll:20} {drift:5} "
            f"{v['lease']:7} {standby:<7} {_short(v.get('last_error') if reported else None, 60)}"
        )


@contextmanager
def _source_command(config: Path | None, name: str) -> Iterator[tuple[Settings, Any]]:
    """Settings and store for a command on source ``name``: exit 2 (listing the configured names)
    unless it is configured; the store's engine is disposed afterwards."""
    settings = _settings(config)
    try:
        settings.source(name)
    except ConfigurationError as exc:
        _fail(str(exc))
    store = _source_store(settings)
    try:
        yield settings, store
    finally:
        store.engine.dispose()


@sources_app.command("pause")
def sources_pause(
    name: Annotated[str, typer.Argument(help="Source name from the configuration.")],
    config: ConfigOpt = None,
) -> None:
    """Stop polling a source (its runner observes it within sources[].status_interval) until resumed."""
    from gateway.sources import ops

    with _source_command(config, name) as (settings, store):
        ops.pause(settings, store, name)
    interval = settings.source(name).status_interval
    typer.echo(f"source {name!r}: pause requested; its runner stops polling within {interval:g} s "
               f"(state paused-by-operator). Resume with `gateway sources resume {name}`.")


@sources_app.command("resume")
def sources_resume(
    name: Annotated[str, typer.Argument(help="Source name from the configuration.")],
    config: ConfigOpt = None,
) -> None:
    """Let a paused, failed or drift-stopped source poll again (from its committed cursor)."""
    from gateway.sources import ops

    with _source_command(config, name) as (settings, store):
        _, row = ops.resume(settings, store, name)
    note = ops.resume_note(row.state)
    typer.echo(f"source {name!r}: resume requested (was {row.state}).{' ' + note if note else ''}")


@sources_app.command("run")
def sources_run(
    name: Annotated[str, typer.Argument(help="Source name from the configuration.")],
    config: ConfigOpt = None,
) -> None:
    """Poll a source now instead of waiting for the rest of its interval (POST /v1/sources/NAME/run).

    Its runner sees the request within sources[].status_interval. A paused, failed or
    drift-stopped source does not poll: resume it instead.
    """
    from gateway.sources import ops

    with _source_command(config, name) as (settings, store):
        try:
            row = ops.run_now(settings, store, name, f"cli:{_operator()}")
        except ops.SourceNotRunnableError as exc:
            _fail(str(exc), 1)
            raise
    typer.echo(f"source {name!r}: {ops.run_now_note(row, settings.source(name))}")


@sources_app.command("accept-drift")
def sources_accept_drift(
    name: Annotated[str, typer.Argument(help="Source name from the configuration.")],
    config: ConfigOpt = None,
) -> None:
    """Make the source's current schema fingerprint the baseline, clear the drift and resume it."""
    with _source_command(config, name) as (_, store):
        row = store.get_source_status(name)
        drift = row.drift if row else None
        if not drift:
            typer.echo(f"source {name!r}: no drift recorded; nothing to accept.")
            return
        store.set_fingerprint_baseline(name, drift["current"], drift.get("current_parts") or {})
        # Resume a drift-stopped source; never lift an operator's pause as a side effect.
        resume = row is not None and row.state == "drift-stopped" and row.desired_state == "running"
        if resume:
            store.set_source_desired_state(name, "running")
    changed = ", ".join(drift.get("changed") or []) or "-"
    typer.echo(f"source {name!r}: fingerprint {drift['current']} is the new baseline (changed: {changed}); "
               f"drift cleared{', source resumed' if resume else ''}.")


def _json_text(value: Any) -> str:
    """A cursor as compact JSON text."""
    from gateway.events.jsonsafe import dumps, jsonable

    return dumps(jsonable(value)).decode()


def _show_cursor(name: str, state: Any, now: Any) -> None:
    """Print a source's committed cursor, epoch and lease."""
    typer.echo(f"source {name!r}")
    if state is None or state.cursor is None:
        typer.echo("  cursor:    none committed (the runner starts from the adapter's initial cursor)")
    else:
        typer.echo(f"  cursor:    {_json_text(state.cursor)}")
    if state is None:
        typer.echo("  epoch:     -\n  lease:     free (the source never ran)")
        return
    typer.echo(f"  committed: {_stamp(state.updated_at)} ({state.events_total} events in total)")
    typer.echo(f"  epoch:     {state.epoch}")
    if state.lease_owner is None:
        typer.echo("  lease:     free")
    else:
        left = (state.lease_until - now).total_seconds() if state.lease_until else 0.0
        how = f"live, {left:.0f} s left" if state.lease_live(now) else "expired"
        typer.echo(f"  lease:     held by {state.lease_owner} until {_stamp(state.lease_until)} ({how})")


@sources_app.command("cursor")
def sources_cursor(
    name: Annotated[str, typer.Argument(help="Source name from the configuration.")],
    config: ConfigOpt = None,
    set_to: Annotated[Optional[str], typer.Option("--set", help="Move the cursor to this JSON value (a preview unless --yes).")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Move the cursor back to the adapter's initial cursor (a preview unless --yes).")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Apply the move; without it --set/--reset only print a preview.")] = False,
) -> None:
    """Show a source's committed cursor, epoch and lease; or move the cursor (--set JSON, --reset).

    A move prints a dry-run preview (the cursor now and after, and how many rows would be read
    again or skipped, when the adapter can count them) and changes nothing unless --yes is given.
    Applied, it bumps the source's fencing epoch: a running runner is fenced and continues from
    the new cursor. The REST twins are GET/PUT/DELETE /v1/sources/NAME/cursor (gateway.sources.ops).
    """
    import json

    from gateway.events import utcnow
    from gateway.sources import ops
    from gateway.store import Actor

    if set_to is not None and reset:
        _fail("give either --set JSON or --reset, not both")
    if yes and set_to is None and not reset:
        _fail("--yes applies a move: give --set JSON or --reset")
    target: Any = None
    if set_to is not None:
        try:
            target = json.loads(set_to)
        except ValueError as exc:
            _fail(f"--set: not valid JSON ({exc}): {set_to!r}")
    with _source_command(config, name) as (settings, store):
        if set_to is None and not reset:
            _show_cursor(name, store.get_cursor(name), utcnow())
            return
        src = settings.source(name)
        try:
            preview = ops.preview_cursor_move(settings, store, name, target, reset=reset)
        except ConfigurationError as exc:
            _fail(str(exc))
            raise
        unknown = f"unknown ({preview.unknown_reason})"
        typer.echo(f"source {name!r}: move the cursor{'' if yes else ' -- dry run, nothing changed'}")
        typer.echo(f"  now:    {_json_text(preview.before)}  (epoch {preview.epoch})")
        note = "  (the adapter's initial cursor)" if reset else ""
        typer.echo(f"  after:  {_json_text(preview.after)}{note}")
        reread, skipped = preview.rows_read_again, preview.rows_skipped
        typer.echo(f"  rows read again: {unknown if reread is None else reread}")
        typer.echo(f"  rows skipped:    {unknown if skipped is None else skipped}")
        if not yes:
            typer.echo("Run again with --yes to apply.")
            return
        new_epoch = ops.apply_cursor_move(store, preview, Actor(None, f"cli:{_operator()}"))
    _setup_logging("info")
    log.warning(
        "source %r: cursor moved by an operator (%s@%s): %s -> %s; epoch %d -> %d",
        name, _operator(), socket.gethostname(), _json_text(preview.before), _json_text(preview.after),
        preview.epoch, new_epoch,
    )
    third = src.lease_ttl / 3
    typer.echo(
        f"applied: epoch {new_epoch}. A running runner of {name!r} is fenced within {third:g} s (its next lease "
        "renewal) or at its next commit, drops the batch in flight and continues from the new cursor."
    )


def _operator() -> str:
    """The OS user running the command, for the log line of a cursor move."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 -- no user name in some containers
        return "unknown"


@sources_app.command("test")
def sources_test(
    name: Annotated[str, typer.Argument(help="Source name from the configuration.")],
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="Records to read.")] = 5,
    from_start: Annotated[bool, typer.Option(help="Ignore the committed cursor.")] = False,
    allow_redelivery: Annotated[bool, typer.Option(
        help="Sources that consume (a legacy queue): take the messages and hand them back. On a quorum queue "
        "each dry run counts as a delivery toward the delivery limit.")] = False,
) -> None:
    """Dry run: connect, read once from the committed cursor, print the mapped events; commit nothing."""
    from gateway.events.jsonsafe import dumps
    from gateway.sources.mapping import Mapper
    from gateway.sources.runner import build_adapter
    from gateway.store import EventStore, engine_from_settings

    settings = _settings(config)
    try:
        src = settings.source(name)
        adapter = build_adapter(src)
    except (ConfigurationError, ValidationError) as exc:
        _fail(str(exc))
        raise
    if adapter.dry_run_redelivers and not allow_redelivery:
        _fail(f"source {name!r} ({adapter.kind}) consumes its messages: a dry run takes them and hands them back, "
              "and a quorum queue counts that as a delivery (after delivery_limit such runs the gateway would "
              "dead-letter them unprocessed). Run again with --allow-redelivery to accept that.")
    cursor = None
    if not from_start:
        engine = engine_from_settings(settings.store)
        try:
            state = EventStore(engine).get_cursor(name)
            cursor = state.cursor if state else None
        except GatewayError:
            typer.echo("note: the store has no cursor table yet; reading from the start", err=True)
        finally:
            engine.dispose()
    if cursor is None:
        cursor = adapter.initial_cursor()
    mapper = Mapper(src.mapping, src.name, adapter.kind)
    try:
        adapter.open()
        batch = adapter.fetch(cursor, limit)
    except Exception as exc:
        err = adapter.classify_error(exc)
        _fail(f"source {name!r}: {type(err).__name__}: {err}", 1)
        raise
    finally:
        adapter.close()
    for rec in batch.records:
        try:
            typer.echo(dumps(mapper.to_event(rec).to_dict()).decode())
        except GatewayError as exc:
            typer.echo(f"rejected (would go to dead letters): {exc}")
    for rej in batch.rejects:
        typer.echo(f"rejected (would go to dead letters): {rej.error_class}: {rej.reason}")
    typer.echo(
        f"-- {len(batch.records)} record(s) and {len(batch.rejects)} reject(s) read from cursor {cursor!r}; "
        f"the cursor would advance to "
        f"{batch.cursor!r}{' (more waiting)' if batch.has_more else ''}. Dry run: nothing was committed.",
        err=True,
    )


def _dead_letter_dict(d: Any, *, full: bool) -> dict[str, Any]:
    out = {
        "id": d.id, "stage": d.stage, "source_name": d.source_name, "error_class": d.error_class,
        "reason": d.reason, "attempts": d.attempts, "event_id": d.event_id, "created_at": d.created_at.isoformat(),
        "state": d.state, "replayed_at": d.replayed_at.isoformat() if d.replayed_at else None,
        "replay_count": d.replay_count, "last_replay_outcome": d.last_replay_outcome,
    }
    if full:
        from gateway.deadletters import dead_letter_position

        out.update(
            payload=d.payload, headers=d.headers, position=dead_letter_position(d),
            last_replay_at=d.last_replay_at.isoformat() if d.last_replay_at else None,
            last_replay_detail=d.last_replay_detail,
        )
    return out


_STAGES_HELP = "source | scoring | bridge | broker"
StateOpt = Annotated[Optional[str], typer.Option(
    "--state", help="open (not replayed) | replayed | all (default: all).",
)]


def _check_state(state: str | None) -> None:
    if state is not None and state not in ("open", "replayed", "all"):
        _fail(f"--state: expected open, replayed or all; got {state!r}")


@dead_app.command("list")
def dead_letters_list(
    config: ConfigOpt = None,
    stage: Annotated[Optional[str], typer.Option(help=_STAGES_HELP)] = None,
    source: Annotated[Optional[str], typer.Option(help="Only this source's dead letters.")] = None,
    error_class: Annotated[Optional[str], typer.Option("--error-class", help="e.g. DecodeError, SoapFaultError, delivery_limit.")] = None,
    state: StateOpt = None,
    after: Annotated[Optional[int], typer.Option(help="Only ids after this one (paging).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Most to list.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines with the payload and headers.")] = False,
) -> None:
    """List dead letters, oldest first, filtered by stage, source, error class and state."""
    from gateway.events.jsonsafe import dumps_text

    _check_state(state)
    store = _source_store(_settings(config))
    try:
        rows = store.list_dead_letters(
            stage=stage, source_name=source, error_class=error_class, state=state, after_id=after, limit=limit
        )
    finally:
        store.engine.dispose()
    if as_json:
        for d in rows:
            typer.echo(dumps_text(_dead_letter_dict(d, full=True)))
        return
    typer.echo(f"{'ID':>6}  {'CREATED':20} {'STAGE':8} {'SOURCE':20} {'ERROR':24} {'TRIES':>5}  {'STATE':8} REASON")
    for d in rows:
        typer.echo(
            f"{d.id:>6}  {d.created_at.strftime('%Y-%m-%dT%H:%M:%SZ'):20} {d.stage:8} {_short(d.source_name, 20):20} "
            f"{_short(d.error_class, 24):24} {d.attempts:>5}  {d.state:8} {_short(d.reason, 90)}"
        )
    if len(rows) == limit:
        typer.echo(f"-- more after id {rows[-1].id}: --after {rows[-1].id}", err=True)


@dead_app.command("show")
def dead_letters_show(
    dead_letter_id: Annotated[int, typer.Argument(help="Dead letter id.")],
    config: ConfigOpt = None,
) -> None:
    """Everything about one dead letter: error, attempts, source, position, headers and payload."""
    from gateway.events.jsonsafe import dumps_text

    store = _source_store(_settings(config))
    try:
        d = store.get_dead_letter(dead_letter_id)
    finally:
        store.engine.dispose()
    if d is None:
        _fail(f"dead letter {dead_letter_id} does not exist", 1)
        return
    typer.echo(dumps_text(_dead_letter_dict(d, full=True)))


@dead_app.command("replay")
def dead_letters_replay(
    ids: Annotated[Optional[list[int]], typer.Argument(help="Dead letter ids (default: select by the filters).")] = None,
    config: ConfigOpt = None,
    stage: Annotated[Optional[str], typer.Option(help=_STAGES_HELP)] = None,
    source: Annotated[Optional[str], typer.Option(help="Only this source's dead letters.")] = None,
    error_class: Annotated[Optional[str], typer.Option("--error-class", help="e.g. ContractError, delivery_limit.")] = None,
    rate: Annotated[float, typer.Option(min=0.01, help="Most dead letters replayed per second.")] = 10.0,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Most dead letters selected by the filters.")] = 100,
    again: Annotated[bool, typer.Option("--again", help="Also replay dead letters that were replayed already.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would happen.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Replay a filter selection without asking.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome of every dead letter as JSON.")] = False,
) -> None:
    """Replay dead letters through the outbox: idempotent, rate-limited, durable.

    An event already in the outbox is published again; a CloudEvent payload is accepted into the
    outbox; a source record is mapped again with the source's current mapping. Without ids the
    selection (by default the open dead letters matching the filters) is previewed first and
    replayed after a confirmation (or --yes). Exit code 1 when a dead letter could not be replayed.
    """
    from gateway.deadletters import DeadLetterReplayer, DeadLetterSelection
    from gateway.events.jsonsafe import dumps_text

    if ids and (stage or source or error_class):
        _fail("give dead letter ids or filters (--stage, --source, --error-class), not both")
    settings = _settings(config)
    store = _source_store(settings)
    try:
        replayer = DeadLetterReplayer(store, settings.sources, rate=rate)
        selection = DeadLetterSelection(
            ids=tuple(ids or ()), stage=stage, source_name=source, error_class=error_class, limit=limit
        )
        rows, missing = replayer.select(selection, again=again)
        if not ids and not dry_run and not yes:
            preview = replayer.replay_rows(rows, again=again, dry_run=True)
            _print_replay(preview)
            if not preview.replayed:
                return
            typer.confirm(f"Replay {preview.replayed} dead letter(s) at most {rate:g} per second?", abort=True)
        report = replayer.replay_rows(rows, again=again, dry_run=dry_run, not_found=missing)
        if not dry_run and report.replayed:
            _audit(store, "dead_letters.replay", f"dead-letters:{report.replayed}",
                   {"replayed": [i.id for i in report.items if i.outcome in ("requeued", "accepted")], "again": again})
    finally:
        store.engine.dispose()
    if as_json:
        typer.echo(dumps_text(report.to_dict()))
    else:
        _print_replay(report)
    if not dry_run and report.replayed:
        _setup_logging("info")
        log.warning("dead letters replayed by an operator (%s): %s", _operator(),
                    [i.id for i in report.items if i.outcome in ("requeued", "accepted")])
    if report.failed:
        raise typer.Exit(1)


def _print_replay(report: Any) -> None:
    """One line per dead letter that failed (every one in a preview), then the counts."""
    would = "would be " if report.dry_run else ""
    for item in report.items:
        if item.outcome == "failed" or report.dry_run:
            what = item.detail if item.outcome == "failed" else f"{item.outcome}: {', '.join(item.event_ids)}"
            typer.echo(f"{item.id:>6}  {item.stage:8} {item.outcome:9} {what}")
    for missing in report.not_found:
        typer.echo(f"{missing:>6}  {'-':8} {'failed':9} dead letter {missing} does not exist")
    typer.echo(
        f"{'dry run: ' if report.dry_run else ''}{would}replayed {report.replayed} "
        f"(requeued {report.count('requeued')}, accepted {report.count('accepted')}), "
        f"skipped {report.skipped}, failed {report.failed}"
    )


@dead_app.command("delete")
def dead_letters_delete(
    ids: Annotated[list[int], typer.Argument(help="Dead letter ids.")],
    config: ConfigOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really delete (otherwise: say what would be deleted).")] = False,
) -> None:
    """Delete dead letters (after inspecting or replaying them)."""
    store = _source_store(_settings(config))
    try:
        found = [i for i in ids if store.get_dead_letter(i) is not None]
        missing = sorted(set(ids) - set(found))
        if not yes:
            typer.echo(f"would delete {len(found)} dead letter(s): {found}" + (f"; not found: {missing}" if missing else "")
                       + ". Add --yes to delete.")
            return
        n = store.delete_dead_letters(found)
        if n:
            _audit(store, "dead_letters.delete", f"dead-letters:{n}", {"ids": found})
    finally:
        store.engine.dispose()
    log.warning("dead letters deleted by an operator: %s", found)
    typer.echo(f"deleted {n} dead letter(s)" + (f"; not found: {missing}" if missing else ""))


@scoring_app.command("compare")
def scoring_compare(
    config: ConfigOpt = None,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Decision threshold of the agreement.")] = 0.5,
    primary: Annotated[Optional[str], typer.Option(help="Primary model name (default: scoring.model).")] = None,
    shadow: Annotated[Optional[str], typer.Option(help="Shadow model name (default: scoring.shadow.model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object.")] = False,
) -> None:
    """Compare the shadow model with the primary on the events both scored (docs/scoring.md, Shadow scoring)."""
    from gateway.events.jsonsafe import dumps_text

    settings = _settings(config)
    sc = settings.scoring
    shadow = shadow or (sc.shadow.model if sc.shadow is not None else None)
    if not shadow:
        _fail("no shadow model: set scoring.shadow.model or pass --shadow")
        return
    store = _source_store(settings)
    try:
        report = store.compare_scores(primary or sc.model, shadow, threshold=threshold)
    finally:
        store.engine.dispose()
    if as_json:
        typer.echo(dumps_text(report.to_dict()))
        return
    typer.echo(f"primary {report.primary}  vs  shadow {report.shadow}: {report.count} events scored by both")
    if not report.count:
        return
    typer.echo(f"agreement at {report.threshold:g}: {report.agreement:.1%}")
    typer.echo(f"mean absolute difference: {report.mean_abs_diff:.4f}")
    typer.echo(f"{'BIN':11} {'PRIMARY':>8} {'SHADOW':>8}")
    for i, (a, b) in enumerate(zip(report.primary_histogram, report.shadow_histogram)):
        hi = "]" if i == len(report.primary_histogram) - 1 else ")"
        typer.echo(f"[{i / 10:.1f}, {(i + 1) / 10:.1f}{hi} {a:>8} {b:>8}")


def _run_roles(
    settings: Settings, roles: list[str], metrics_port: int | None = None, scoring_routes: list[str | None] | None = None
) -> None:
    from gateway.runtime import Gateway, tune_process

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    gw = Gateway(settings, roles=roles, scoring_routes=scoring_routes)
    try:
        gw.start()
    except GatewayError as exc:
        gw.stop()
        _fail(str(exc), 2 if isinstance(exc, ConfigurationError) else 1)
    if metrics_port:
        try:
            gw.serve_metrics(metrics_port)
        except OSError as exc:  # e.g. the port is taken: do not run half-started without metrics
            gw.stop()
            _fail(f"resilience.metrics_port {metrics_port}: cannot serve /metrics ({exc})", 1)
    tune_process(settings.process)
    log.info("gateway running roles: %s", ", ".join(roles))
    stop.wait()
    log.info("stopping: finishing in-flight work")
    gw.stop()


@app.command()
def run(config: ConfigOpt = None, log_level: LogOpt = "info") -> None:
    """Run every role (sources, relay, scorer, API) in one process."""
    _setup_logging(log_level)
    _run_roles(_settings(config), ["sources", "relay", "scorer", "api", "bridge"])


@app.command()
def api(config: ConfigOpt = None, log_level: LogOpt = "info") -> None:
    """Run the REST API alone."""
    _setup_logging(log_level)
    _run_roles(_settings(config), ["api"])


@app.command()
def worker(
    role: Annotated[str, typer.Option("--role", help="sources | relay | scorer | bridge")],
    config: ConfigOpt = None,
    log_level: LogOpt = "info",
    route: Annotated[Optional[list[str]], typer.Option(
        "--route",
        help="Scorer role only: serve just this scoring route (repeatable; 'default' is the default route). "
        "Default: every route.",
    )] = None,
) -> None:
    """Run one worker role alone (scale each role separately; scorers also per scoring route)."""
    if role not in ("sources", "relay", "scorer", "bridge"):
        _fail(f"--role: expected one of sources, relay, scorer, bridge; got {role!r}")
    _setup_logging(log_level)
    settings = _settings(config)
    if settings.bus.url is None:
        _fail("worker roles in separate processes need RabbitMQ: set bus.url (GATEWAY_BUS__URL)")
    routes: list[str | None] | None = None
    if route:
        if role != "scorer":
            _fail(f"--route applies to --role scorer only, not {role!r}")
        known = {r or "default": r for r in settings.scoring.route_names()}
        bad = [r for r in route if r not in known]
        if bad:
            _fail(f"--route: unknown scoring route(s) {bad}; configured: {sorted(known)}")
        routes = [known[r] for r in route]
    # No API here: own /metrics.
    _run_roles(settings, [role], metrics_port=settings.resilience.metrics_port, scoring_routes=routes)


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(help="Stop after this many seconds.")] = 25.0,
    rows: Annotated[int, typer.Option(help="Historic legacy rows to create.")] = 3000,
    port: Annotated[int, typer.Option(help="API port (0: any free port).")] = 8080,
    workdir: Annotated[Optional[Path], typer.Option(help="Folder for the demo databases (default: a temp folder).")] = None,
    store_url: Annotated[Optional[str], typer.Option(envvar="GATEWAY_STORE__URL", help="Gateway store URL (default: SQLite in workdir).")] = None,
    amqp_url: Annotated[Optional[str], typer.Option(envvar="GATEWAY_BUS__URL", help="RabbitMQ URL (default: in-process bus).")] = None,
    legacy_amqp_url: Annotated[str, typer.Option(
        envvar="GATEWAY_DEMO_LEGACY_AMQP_URL",
        help="A RabbitMQ to play the legacy mainframe queue; the queue source is skipped when none answers.",
    )] = "amqp://guest:guest@127.0.0.1:5672/%2F",
    log_level: LogOpt = "warning",
) -> None:
    """Legacy rows become scored events: a self-contained demo (SQLite + in-process bus by default)."""
    from gateway.demo import (
        DEMO_QUEUE,
        LegacyWriter,
        MainframeQueueWriter,
        SoapOrderWriter,
        create_legacy_db,
        delete_topology,
        demo_settings,
        legacy_queue_reachable,
        start_soap_service,
    )
    from gateway.runtime import Gateway, tune_process

    _setup_logging(log_level)
    folder = workdir or Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    legacy_url = f"sqlite:///{folder / 'legacy.db'}"
    typer.echo(f"legacy-gateway demo -- working in {folder}")
    next_id = create_legacy_db(legacy_url, rows)
    typer.echo(f"  legacy database: {rows} card transactions in {folder / 'legacy.db'} (about 2% anomalies)")
    orders = max(rows // 5, 10)
    sim = start_soap_service(orders)
    typer.echo(f"  legacy SOAP service: {orders} orders at {sim.endpoint} (WSDL: {sim.wsdl_url})")
    why_not = legacy_queue_reachable(legacy_amqp_url)
    if why_not is None:
        typer.echo(f"  legacy queue: EBCDIC fixed-width bookings on {DEMO_QUEUE} (RabbitMQ at {_host_of(legacy_amqp_url)})")
    else:
        typer.echo(f"  legacy queue: skipped, the legacy RabbitMQ at {_host_of(legacy_amqp_url)} is not usable "
                   f"({why_not}); set --legacy-amqp-url to include it")
    settings = _settings(
        None, **demo_settings(folder, port=port, store_url=store_url, amqp_url=amqp_url, soap_wsdl=sim.wsdl_url,
                              legacy_amqp_url=legacy_amqp_url if why_not is None else None)
    )
    typer.echo(f"  store: {'SQLite' if settings.store.url.get_secret_value().startswith('sqlite') else 'external'}; "
               f"bus: {'RabbitMQ, prefix ' + settings.bus.prefix if settings.bus.url else 'in-process'}")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    gw = Gateway(settings)
    for src in settings.sources:
        gw.store.set_cursor(src.name, None)  # a fresh legacy database: read it from the start
    gw.start()
    tune_process(settings.process)
    writer = LegacyWriter(legacy_url, next_id)
    soap_writer = SoapOrderWriter(sim, orders + 1)
    writers: list[Any] = [writer, soap_writer]
    queue_writer = MainframeQueueWriter(legacy_amqp_url) if why_not is None else None
    if queue_writer is not None:
        writers.append(queue_writer)
    wthreads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in writers]
    for t in wthreads:
        t.start()
    if gw.api_server is not None:
        for _ in range(50):
            if gw.api_server.started:
                break
            time.sleep(0.1)
        sock = gw.api_server.servers[0].sockets[0].getsockname() if gw.api_server.servers else ("127.0.0.1", port)
        typer.echo(f"  API: http://{sock[0]}:{sock[1]}/v1/events  (OpenAPI: /docs)")
        if settings.api.auth:
            from gateway.api.auth import key_secret

            _, demo_token = gw.store.create_api_key("demo", ["events:read", "events:write"], secret=key_secret(settings, gw.store))
            typer.echo(f"  API key (events:read, events:write): curl -H 'Authorization: Bearer {demo_token}' ...")
    t0 = time.monotonic()
    try:
        while not stop.wait(1.0):
            s = gw.store.stats()
            typer.echo(
                f"  [{time.monotonic() - t0:5.1f}s] legacy rows {rows + writer.written:6d} (+{writer.updated} updated) "
                f"| SOAP orders {orders + soap_writer.written:5d} (+{soap_writer.updated}) "
                + (f"| queue records {queue_writer.written:5d} " if queue_writer else "")
                + f"| events {s['events']:6d} "
                f"| published {s['published']:6d} | scored {s['scores']:6d} | dead letters {s['dead_letters']}"
            )
            if time.monotonic() - t0 >= seconds:
                break
    finally:
        stop.set()
        for t in wthreads:
            t.join(5)
        top = gw.store.top_scored(10)
        totals = gw.store.list_cursors()
        gw.stop()
        sim.close()
        if settings.bus.url is not None:
            delete_topology(settings.bus.url.get_secret_value(), gw.topology)
    typer.echo("\nEvents per source: " + ", ".join(f"{c.source_name} {c.events_total}" for c in totals))
    typer.echo("\nTop-scored events (the anomaly model learned from the stream, no training data):")
    typer.echo(f"  {'SCORE':>6}  {'SUBJECT':18} {'AMOUNT':>10} {'COUNTRY':7} {'CHANNEL':7} WHY")
    for score, ev in top:
        d = ev.get("data", {})
        typer.echo(
            f"  {score:6.3f}  {str(ev.get('subject')):18} {str(d.get('amount')):>10} {str(d.get('country')):7} "
            f"{str(d.get('channel')):7} {_why(gw, ev['id'])}"
        )
    typer.echo(f"\nDone. Databases kept in {folder}.")


def _host_of(url: str) -> str:
    """``host:port`` of a URL, without credentials."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = parts.port or 5672
    except ValueError:  # not a number: say what was given, do not crash the demo on it
        return f"{parts.hostname or '?'} (invalid port)"
    return f"{parts.hostname or '?'}:{port}"


def _why(gw: Any, event_id: str) -> str:
    stored = gw.store.get_event(event_id)
    if not stored or not stored.scores:
        return ""
    expl = stored.scores[0].get("explanation") or {}
    feats = expl.get("features") if isinstance(expl, dict) else None
    if isinstance(feats, list) and feats:
        return ", ".join(str(f.get("feature", f)) if isinstance(f, dict) else str(f) for f in feats[:2])
    if isinstance(expl, dict):
        return ", ".join(f"{k}" for k in list(expl)[:2])
    return ""


# ---------------------------------------------------------------------------- keys and audit
keys_app = typer.Typer(help="API keys: create (the token is printed once), list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
audit_app = typer.Typer(help="The audit log of admin actions.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def _audit(store: Any, action: str, target: str | None, details: dict[str, Any] | None) -> None:
    """Record an operator's admin action (actor ``cli:<os user>``); a failure is only logged."""
    from gateway.store import Actor

    try:
        store.record_audit(Actor(None, f"cli:{_operator()}"), action, target, details)
    except GatewayError as exc:
        log.warning("could not write the audit log for %s: %s", action, exc)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for.")],
    scope: Annotated[list[str], typer.Option("--scope", help="events:write | events:read | sources:admin | admin; repeat.")],
    source: Annotated[Optional[list[str]], typer.Option("--source", help="Limit the key to this gateway source; repeat (default: every source).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Create an API key and print its token ONCE (the store keeps only a digest)."""
    from gateway.api.auth import key_secret
    from gateway.store import Actor

    settings = _settings(config)
    store = _source_store(settings)
    try:
        secret = key_secret(settings, store)
        key, token = store.create_api_key(name, scope, source or None, secret=secret, actor=Actor(None, f"cli:{_operator()}"))
    except ConfigurationError as exc:
        _fail(str(exc))
        raise
    except ValueError as exc:
        field, _, msg = str(exc).partition(": ")
        _fail(f"--{ {'scopes': 'scope', 'sources': 'source'}.get(field, field)}: {msg}")
        raise
    finally:
        store.engine.dispose()
    typer.echo(f"created key {key.id} ({key.name}): scopes {', '.join(key.scopes)}; "
               f"sources {', '.join(key.sources) if key.sources else 'all'}")
    typer.echo("token (shown only now; store it in a secret manager):", err=True)
    typer.echo(token)


@keys_app.command("list")
def keys_list(
    config: ConfigOpt = None,
    include_revoked: Annotated[bool, typer.Option("--all/--active", help="Also list revoked keys (default) or only active ones.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """List API keys: id, name, scopes, sources, times. Never a token or digest."""
    from gateway.events.jsonsafe import dumps_text

    store = _source_store(_settings(config))
    try:
        keys = store.list_api_keys(include_revoked=include_revoked)
    finally:
        store.engine.dispose()
    if as_json:
        for k in keys:
            typer.echo(dumps_text(k.to_dict()))
        return
    typer.echo(f"{'ID':16}  {'NAME':24} {'STATE':8} {'CREATED':20} {'LAST USED':20} SCOPES / SOURCES")
    for k in keys:
        typer.echo(
            f"{k.id:16}  {_short(k.name, 24):24} {'revoked' if k.revoked else 'active':8} "
            f"{k.created_at.strftime('%Y-%m-%dT%H:%M:%SZ'):20} "
            f"{k.last_used_at.strftime('%Y-%m-%dT%H:%M:%SZ') if k.last_used_at else '-':20} "
            f"{','.join(k.scopes)} / {','.join(k.sources) if k.sources else 'all'}"
        )


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from gateway keys list).")],
    config: ConfigOpt = None,
) -> None:
    """Revoke an API key: its next request gets 401. Exit 1 when there is no such key."""
    from gateway.store import Actor

    store = _source_store(_settings(config))
    try:
        key = store.revoke_api_key(key_id, actor=Actor(None, f"cli:{_operator()}"))
    finally:
        store.engine.dispose()
    if key is None:
        _fail(f"no API key with id {key_id!r} (see gateway keys list)", 1)
        return
    typer.echo(f"revoked key {key.id} ({key.name}) at {key.revoked_at.isoformat() if key.revoked_at else '?'}")


@audit_app.command("list")
def audit_list(
    config: ConfigOpt = None,
    action: Annotated[Optional[str], typer.Option(help="Only this action (key.create, key.revoke, dead_letters.replay, ...).")] = None,
    after: Annotated[Optional[int], typer.Option(help="Only entries after this id (paging).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Most to list.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines with the details.")] = False,
) -> None:
    """List the audit log, oldest first: who did which admin action to what, and when."""
    from gateway.events.jsonsafe import dumps_text
    from gateway.store import AUDIT_ACTIONS

    if action is not None and action not in AUDIT_ACTIONS:
        _fail(f"--action: expected one of {', '.join(AUDIT_ACTIONS)}; got {action!r}")
    store = _source_store(_settings(config))
    try:
        rows = store.list_audit(action=action, after_id=after, limit=limit)
    finally:
        store.engine.dispose()
    for r in rows:
        if as_json:
            typer.echo(dumps_text({"id": r.id, "at": r.at.isoformat(), "actor_id": r.actor_id, "actor_name": r.actor_name,
                                   "action": r.action, "target": r.target, "details": r.details}))
        else:
            typer.echo(f"{r.id:>6}  {r.at.strftime('%Y-%m-%dT%H:%M:%SZ')}  {_short(r.actor_name, 24):24} "
                       f"{r.action:22} {_short(r.target, 30):30} {_short(dumps_text(r.details) if r.details else '', 80)}")


adapter_app = typer.Typer(help="Adapter plugins: scaffold a new one.", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")


@adapter_app.command("new")
def adapter_new(
    name: Annotated[str, typer.Argument(help="Adapter name users write as `adapter:`, e.g. erp-files.")],
    directory: Annotated[Optional[Path], typer.Option("--dir", "-d", help="Folder to create (default: ./NAME).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty folder.")] = False,
) -> None:
    """Scaffold an adapter plugin package: entry point, typed config, tests using the standard suite, README."""
    from gateway.scaffold import names_for, render_plugin

    target = directory if directory is not None else Path(name)
    try:
        written = render_plugin(name, target, force=force)
    except (ValueError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    names = names_for(name)
    for path in written:
        typer.echo(f"created {path}")
    typer.echo(f"next: pip install -e '{target}[test]' && pytest {target}  (adapter {names.adapter!r}, package {names.package})")


plugins_app = typer.Typer(help="Installed plugins: adapters, codecs, scorers.", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")


@plugins_app.command("list")
def plugins_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """List every installed plugin (entry points gateway.adapters, gateway.codecs, gateway.scorers), loading each:
    a plugin that fails to import is shown as broken with the reason (the gateway skips it)."""
    import json as _json
    from importlib.metadata import EntryPoint

    from gateway import plugins
    from gateway.codecs import registry as codecs
    from gateway.scoring import registry as scorers

    # The same discovery the gateway uses (a plugin may not take a built-in's name).
    groups = {"adapter": plugins._entry_points(), "codec": codecs._entry_points(), "scorer": scorers._entry_points()}
    rows: list[dict[str, Any]] = []
    for kind, eps in groups.items():
        for name, ep in sorted(eps.items()):
            assert isinstance(ep, EntryPoint)
            dist = ep.dist.name if ep.dist is not None else "?"
            try:
                ep.load()
                status, detail = "ok", ""
            except Exception as exc:  # noqa: BLE001 -- report, never crash the listing
                status, detail = "broken", f"{type(exc).__name__}: {exc}"
            rows.append({"kind": kind, "name": name, "target": ep.value, "package": dist, "status": status,
                         "error": detail or None})
    if as_json:
        typer.echo(_json.dumps(rows, indent=2))
        return
    typer.echo(f"{'KIND':8} {'NAME':18} {'PACKAGE':22} {'STATUS':7} TARGET")
    for r in rows:
        typer.echo(f"{r['kind']:8} {r['name']:18} {r['package']:22} {r['status']:7} {r['target']}"
                   + (f"  ({r['error']})" if r["error"] else ""))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
