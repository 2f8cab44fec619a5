"""Dead letters as a managed store: filter, get and delete (store, every database) and `gateway dead-letters`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from gateway.cli import app
from gateway.store import EventStore, make_engine
from gateway.store.migrate import upgrade

cli = CliRunner()


def park(store: EventStore) -> list[int]:
    rows: list[dict[str, Any]] = [
        {"stage": "source", "source_name": "orders", "error_class": "ContractError", "reason": "no field 'id'",
         "payload": '{"data": {"x": 1}}'},
        {"stage": "source", "source_name": "queue", "error_class": "DecodeError",
         "reason": "record 0, field 'amount' (bytes 28-32): packed decimal has invalid sign nibble 0x7",
         "payload": "\\u00c1\\u00c2", "headers": {"message_id": "m-1", "routing_key": "Q"}, "attempts": 2},
        {"stage": "scoring", "source_name": "orders", "error_class": "ContractError", "reason": "not a CloudEvent",
         "payload": "{}", "event_id": "e-1"},
        {"stage": "bridge", "source_name": None, "error_class": "EncodeError", "reason": "PIC X(9) holds 9",
         "payload": "{}"},
    ]
    return [store.add_dead_letter(**r) for r in rows]


def test_filters_get_and_delete_on_every_store(any_store: EventStore) -> None:
    ids = park(any_store)
    assert [d.id for d in any_store.list_dead_letters()] == ids
    assert [d.id for d in any_store.list_dead_letters(stage="source")] == ids[:2]
    assert [d.id for d in any_store.list_dead_letters(source_name="orders")] == [ids[0], ids[2]]
    assert [d.id for d in any_store.list_dead_letters(error_class="ContractError", stage="scoring")] == [ids[2]]
    assert [d.id for d in any_store.list_dead_letters(after_id=ids[1], limit=1)] == [ids[2]]
    one = any_store.get_dead_letter(ids[1])
    assert one is not None and one.headers == {"message_id": "m-1", "routing_key": "Q"} and one.attempts == 2
    assert any_store.get_dead_letter(ids[-1] + 100) is None
    assert any_store.delete_dead_letters([ids[0], ids[3], ids[3] + 100]) == 2
    assert [d.id for d in any_store.list_dead_letters()] == [ids[1], ids[2]]
    assert any_store.delete_dead_letters([]) == 0


def config(tmp_path: Path) -> tuple[Path, EventStore]:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"url": url}}))
    engine = make_engine(url)
    upgrade(engine)
    return cfg, EventStore(engine)


def test_cli_lists_filters_shows_and_deletes(tmp_path: Path) -> None:
    cfg, store = config(tmp_path)
    ids = park(store)
    out = cli.invoke(app, ["dead-letters", "list", "-c", str(cfg)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:6] == ["ID", "CREATED", "STAGE", "SOURCE", "ERROR", "TRIES"] and len(lines) == 5
    assert "DecodeError" in lines[2] and "packed decimal has invalid sign nibble" in lines[2]

    out = cli.invoke(app, ["dead-letters", "list", "-c", str(cfg), "--stage", "source", "--error-class", "DecodeError", "--json"])
    (item,) = [json.loads(line) for line in out.output.splitlines()]
    assert item["id"] == ids[1] and item["headers"]["message_id"] == "m-1" and item["payload"] == "\\u00c1\\u00c2"

    out = cli.invoke(app, ["dead-letters", "list", "-c", str(cfg), "--limit", "2"])
    assert f"--after {ids[1]}" in out.output  # says how to get the next page

    out = cli.invoke(app, ["dead-letters", "show", str(ids[2]), "-c", str(cfg)])
    shown = json.loads(out.output)
    assert shown["stage"] == "scoring" and shown["event_id"] == "e-1" and shown["payload"] == "{}"
    out = cli.invoke(app, ["dead-letters", "show", "999", "-c", str(cfg)])
    assert out.exit_code == 1 and "dead letter 999 does not exist" in out.output

    out = cli.invoke(app, ["dead-letters", "delete", str(ids[0]), "999", "-c", str(cfg)])
    assert out.exit_code == 0 and f"would delete 1 dead letter(s): [{ids[0]}]; not found: [999]" in out.output
    assert len(store.list_dead_letters()) == 4  # a preview deletes nothing
    out = cli.invoke(app, ["dead-letters", "delete", str(ids[0]), "--yes", "-c", str(cfg)])
    assert out.exit_code == 0 and "deleted 1 dead letter(s)" in out.output
    assert [d.id for d in store.list_dead_letters()] == ids[1:]
    store.engine.dispose()


def replay_config(tmp_path: Path) -> tuple[Path, EventStore]:
    """A configuration with the 'orders' source (its current mapping re-maps parked records)."""
    from tests.unit.test_dead_letter_replay import MAPPING_V2

    url = f"sqlite:///{tmp_path / 'g.db'}"
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"url": url}, "sources": [{
        "name": "orders", "adapter": "sql", "mapping": MAPPING_V2,
        "config": {"url": "sqlite://", "table": "legacy_orders", "mode": "timestamp_key",
                   "timestamp_column": "rev", "key_column": "order_no"},
    }]}))
    engine = make_engine(url)
    upgrade(engine)
    return cfg, EventStore(engine)


def test_cli_replays_by_ids_with_counts_and_reasons(tmp_path: Path) -> None:
    from tests.unit.test_dead_letter_replay import make_event, park_record, publish_all, scoring_dead_letter

    cfg, store = replay_config(tmp_path)
    ev = make_event(1)
    store.accept([ev], source_name="orders")
    publish_all(store)
    scoring = scoring_dead_letter(store, ev)
    record = park_record(store, {"order_no": 5, "rev": "r5"})
    other = park(store)  # source (ContractError, record without order_no), queue reject, poison, bridge

    out = cli.invoke(app, ["dead-letters", "replay", str(scoring), str(record), str(other[2]), "999", "-c", str(cfg)])
    assert out.exit_code == 1, out.output  # something could not be replayed
    assert "replayed 2 (requeued 1, accepted 1), skipped 0, failed 2" in out.output
    assert f"dead letter {other[2]} (stage scoring) cannot be replayed: its payload is not a CloudEvent" in out.output
    assert "dead letter 999 does not exist" in out.output
    assert store.get_event(ev.id).status == "pending"  # type: ignore[union-attr]
    assert len(store.list_dead_letters(state="replayed")) == 2

    out = cli.invoke(app, ["dead-letters", "replay", str(scoring), "--json", "-c", str(cfg)])
    report = json.loads(out.output)
    assert out.exit_code == 0 and (report["skipped"], report["replayed"]) == (1, 0)
    out = cli.invoke(app, ["dead-letters", "replay", str(scoring), "--again", "--json", "-c", str(cfg)])
    assert json.loads(out.output)["requeued"] == 1 and store.stats()["events"] == 2

    out = cli.invoke(app, ["dead-letters", "replay", str(scoring), "--stage", "scoring", "-c", str(cfg)])
    assert out.exit_code == 2 and "ids or filters" in out.output
    out = cli.invoke(app, ["dead-letters", "list", "--state", "replayed", "-c", str(cfg)])
    assert out.exit_code == 0 and len(out.output.splitlines()) == 3 and " replayed " in out.output.splitlines()[1]
    out = cli.invoke(app, ["dead-letters", "list", "--state", "closed", "-c", str(cfg)])
    assert out.exit_code == 2 and "--state: expected open, replayed or all" in out.output
    shown = json.loads(cli.invoke(app, ["dead-letters", "show", str(scoring), "-c", str(cfg)]).output)
    assert (shown["state"], shown["replay_count"], shown["last_replay_outcome"]) == ("replayed", 2, "requeued")
    store.engine.dispose()


def test_cli_replay_by_filter_previews_and_asks(tmp_path: Path) -> None:
    from tests.unit.test_dead_letter_replay import make_event

    cfg, store = replay_config(tmp_path)
    ids = [store.add_dead_letter(stage="broker", error_class="rejected", reason="r", source_name="orders",
                                 payload=make_event(i).to_json().decode()) for i in range(3)]
    out = cli.invoke(app, ["dead-letters", "replay", "--stage", "broker", "-c", str(cfg)], input="n\n")
    assert out.exit_code == 1 and "would be replayed 3 (requeued 0, accepted 3)" in out.output and "Aborted" in out.output
    assert store.stats()["events"] == 0 and len(store.list_dead_letters(state="open")) == 3

    out = cli.invoke(app, ["dead-letters", "replay", "--stage", "broker", "--dry-run", "-c", str(cfg)])
    assert out.exit_code == 0 and "dry run: would be replayed 3" in out.output and store.stats()["events"] == 0

    out = cli.invoke(app, ["dead-letters", "replay", "--stage", "broker", "--limit", "1", "-c", str(cfg)], input="y\n")
    assert out.exit_code == 0 and out.output.rstrip().endswith("replayed 1 (requeued 0, accepted 1), skipped 0, failed 0")
    assert [d.id for d in store.list_dead_letters(state="replayed")] == ids[:1]

    out = cli.invoke(app, ["dead-letters", "replay", "--source", "orders", "--error-class", "rejected", "--yes",
                           "--rate", "1000", "-c", str(cfg)])
    assert out.exit_code == 0 and "replayed 2 (requeued 0, accepted 2)" in out.output
    assert store.stats()["events"] == 3 and store.list_dead_letters(state="open") == []
    out = cli.invoke(app, ["dead-letters", "replay", "--stage", "broker", "-c", str(cfg)])
    assert out.exit_code == 0 and "would be replayed 0" in out.output  # nothing open: no question
    store.engine.dispose()


def test_replay_state_and_dedupe_on_every_store(any_store: EventStore) -> None:
    from tests.unit.test_dead_letter_replay import make_event, publish_all

    ev, fresh = make_event(1), make_event(2)
    any_store.accept([ev], source_name="orders")
    publish_all(any_store)
    dl = any_store.add_dead_letter(stage="scoring", error_class="E", reason="r", payload="{}", event_id=ev.id)
    written = any_store.replay_dead_letter(dl, event_ids=[ev.id], events_in=[fresh])
    assert written is not None and (written.requeued, written.accepted, written.outcome) == ([ev.id], [fresh.id], "accepted")
    assert any_store.get_event(ev.id).status == "pending" and any_store.stats()["events"] == 2  # type: ignore[union-attr]
    assert any_store.replay_dead_letter(dl, events_in=[fresh]) is None  # replayed already: rolled back
    assert any_store.replay_dead_letter(dl, events_in=[fresh], again=True) is not None
    d = any_store.get_dead_letter(dl)
    assert d is not None and d.state == "replayed" and d.replay_count == 2 and any_store.stats()["events"] == 2
    assert [x.id for x in any_store.list_dead_letters(state="replayed")] == [dl]
    assert any_store.record_replay_failure(dl, "why", error_class="ContractError", reason="new") is True
    d = any_store.get_dead_letter(dl)
    assert d is not None and (d.attempts, d.reason, d.replay_count, d.last_replay_outcome) == (2, "new", 3, "failed")

    # add_dead_letter_once: by identity key, and not while the scorer's own row for the event is open.
    key = "a" * 64
    first = any_store.add_dead_letter_once(stage="broker", error_class="rejected", reason="r", payload="{}",
                                           event_id="e-9", dedupe_key=key, open_stages=("scoring",))
    assert first[1] is True
    assert any_store.add_dead_letter_once(stage="broker", error_class="rejected", reason="other", payload="{}",
                                          event_id="e-9", dedupe_key=key) == (first[0], False)
    parked = any_store.add_dead_letter(stage="scoring", error_class="E", reason="r", payload="{}", event_id="e-10")
    assert any_store.add_dead_letter_once(stage="broker", error_class="rejected", reason="r", payload="{}",
                                          event_id="e-10", dedupe_key="b" * 64, open_stages=("scoring",)) == (parked, False)
    assert any_store.count_dead_letters(stage="broker") == 1
