"""The API key and audit log store methods on SQLite, PostgreSQL and MariaDB (``any_store``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from gateway.store import Actor, EventStore, make_engine
from gateway.store.keys import parse_token, token_digest
from gateway.store.schema import api_keys

SECRET = b"s" * 32


def test_create_list_revoke_and_touch(any_store: EventStore) -> None:
    cli = Actor(None, "cli:ops")
    key, token = any_store.create_api_key("etl", ["events:read", "admin", "events:read"], None, secret=SECRET, actor=cli)
    assert key.scopes == ("events:read", "admin") and key.sources is None and parse_token(token) == key.id
    limited, _ = any_store.create_api_key("partner", ["events:read"], ["orders", "billing", "orders"], secret=SECRET)
    assert limited.sources == ("billing", "orders")
    found = any_store.api_key_with_digest(key.id)
    assert found is not None and found[1] == token_digest(SECRET, token) and found[0] == key
    with any_store.engine.connect() as conn:
        stored = conn.execute(select(api_keys.c.digest, api_keys.c.scopes, api_keys.c.sources)).all()
    assert all(token not in repr(row) for row in stored)
    assert [k.id for k in any_store.list_api_keys()] == [key.id, limited.id]
    assert any_store.get_api_key(limited.id).sources == ("billing", "orders")  # type: ignore[union-attr]

    any_store.touch_api_key(key.id)
    assert any_store.get_api_key(key.id).last_used_at is not None  # type: ignore[union-attr]
    revoked = any_store.revoke_api_key(key.id, actor=cli)
    assert revoked is not None and revoked.revoked
    assert any_store.revoke_api_key(key.id, actor=cli).revoked_at == revoked.revoked_at  # type: ignore[union-attr]
    assert any_store.revoke_api_key("0" * 16, actor=cli) is None
    assert [k.id for k in any_store.list_api_keys(include_revoked=False)] == [limited.id]
    assert [(a.action, a.target, a.actor_name) for a in any_store.list_audit()] == [
        ("key.create", key.id, "cli:ops"), ("key.revoke", key.id, "cli:ops"),
    ]


def test_invalid_key_fields_store_nothing(any_store: EventStore) -> None:
    for args, word in [(("", ["admin"]), "name"), (("x", []), "scopes"), (("x", ["root"]), "root"),
                       (("x", ["admin"], ["orders"]), "admin"), (("x", ["events:read"], ["bad name!"]), "sources")]:
        with pytest.raises(ValueError, match=word):
            any_store.create_api_key(*args, secret=SECRET)  # type: ignore[arg-type]
    assert any_store.list_api_keys() == [] and any_store.list_audit() == []


def test_audit_log_filters_and_pages(any_store: EventStore) -> None:
    now = [datetime(2024, 5, 1, tzinfo=UTC)]
    store = EventStore(any_store.engine, clock=lambda: now[0])
    for i in range(5):
        now[0] += timedelta(seconds=1)
        store.record_audit(Actor("k1" if i % 2 else None, "x"), "source.cursor.set", f"src-{i}",
                           {"after": {"ts": i, "text": "ünïcode"}})
    store.record_audit(Actor(None, "cli:ops"), "dead_letters.delete", "dead-letter:3", {"ids": [3]})
    rows = store.list_audit()
    assert [r.target for r in rows] == [f"src-{i}" for i in range(5)] + ["dead-letter:3"]
    assert rows[0].at == datetime(2024, 5, 1, 0, 0, 1, tzinfo=UTC) and rows[4].details == {"after": {"ts": 4, "text": "ünïcode"}}
    assert [r.target for r in store.list_audit(after_id=rows[1].id, limit=2)] == ["src-2", "src-3"]
    assert [r.target for r in store.list_audit(actor_id="k1")] == ["src-1", "src-3"]
    assert [r.target for r in store.list_audit(action="dead_letters.delete")] == ["dead-letter:3"]


def test_local_key_secret_is_stable_per_store(any_store: EventStore) -> None:
    first = any_store.local_key_secret()
    assert len(first) == 32 and any_store.local_key_secret() == first
    other = EventStore(any_store.engine)
    assert other.local_key_secret() == first


def test_local_key_secrets_differ_between_stores(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.store.migrate import upgrade

    secrets = []
    for name in ("a", "b"):
        engine = make_engine(f"sqlite:///{tmp_path / name}.db")
        upgrade(engine)
        secrets.append(EventStore(engine).local_key_secret())
        engine.dispose()
    assert secrets[0] != secrets[1]
