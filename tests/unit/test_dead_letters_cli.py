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
