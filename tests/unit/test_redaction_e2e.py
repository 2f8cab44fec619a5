"""The redaction test of issue 8: a configured SSN field never leaves the gateway in clear.

An embedded gateway (sources + relay + scorer on the in-process bus, SQLite store) polls a legacy
SQLite table with an ``ssn`` column under the PII policy ``data.ssn: hash``. The raw SSNs (with or
without dashes) must appear in no stored envelope, no published event (a queue of our own bound
``#`` to the events exchange), no scored event (the same on the scored exchange), no dead letter,
no log record (caplog at DEBUG across the whole run) and no API response (events list and get,
dead letters list and get). The keyed hash is stable: the same SSN gives the same hash in two
events and after a restart with the same secret; another secret gives another hash.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
)

from gateway.api import create_app
from gateway.api.auth import key_secret
from gateway.bus.memory import InMemoryConsumer
from gateway.bus.topology import QueueSpec
from gateway.config import Settings
from gateway.runtime import Gateway
from gateway.store import EventStore
from gateway.store.schema import events as events_table

SECRET = "redaction-secret-" + "s" * 32
OTHER_SECRET = "another-secret-" + "o" * 32
TYPE = "com.acme.person.changed"
# Row 1 and row 4 share an SSN; row 6 breaks the contract (status) and becomes a dead letter.
PEOPLE = [
    (1, "Ada", "078-05-1120", "ACTIVE"),
    (2, "Bob", "219-09-9999", "ACTIVE"),
    (3, "Cyd", "457-55-5462", "ACTIVE"),
    (4, "Dee", "078-05-1120", "ACTIVE"),
    (5, "Eve", "323-45-6789", "ACTIVE"),
    (6, "Fay", "536-22-8741", "BANNED"),
]
SSNS = sorted({p[2] for p in PEOPLE})
FORBIDDEN = SSNS + [s.replace("-", "") for s in SSNS]  # the raw value in any spelling we might produce
T0 = datetime(2024, 3, 1, 9, 0, 0)

META = MetaData()
PEOPLE_TABLE = Table(
    "legacy_people", META,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(20), nullable=False),
    Column("ssn", String(11), nullable=False),
    Column("status", String(10), nullable=False),
    Column("updated_at", DateTime, nullable=False),
)


def _add(url: str, rows: list[tuple[int, str, str, str]], minute: int = 0) -> None:
    engine = create_engine(url)
    META.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(PEOPLE_TABLE), [
            {"id": i, "name": n, "ssn": s, "status": st, "updated_at": T0 + timedelta(minutes=minute, seconds=i)}
            for i, n, s, st in rows
        ])
    engine.dispose()


def _settings(store_url: str, legacy_url: str, secret: str = SECRET) -> Settings:
    return Settings(
        profile="test",
        store={"url": store_url},
        api={"key_secret": "k" * 40, "rate_limit_per_second": 0},
        governance={
            "pii": {"secret": secret, "policies": [{"path": "data.ssn", "action": "hash"}]},
            "contracts": [{"types": [TYPE], "mode": "freeze", "schema": {
                "type": "object", "properties": {"status": {"enum": ["ACTIVE"]}}, "required": ["status"]}}],
        },
        sources=[{
            "name": "people", "adapter": "sql", "interval": 0.05,
            "config": {"url": legacy_url, "table": "legacy_people", "mode": "timestamp_key",
                       "timestamp_column": "updated_at", "key_column": "id", "batch_size": 100},
            "mapping": {"type": TYPE, "entity": "person", "key": ["id"], "version": "updated_at",
                        "time": "updated_at", "subject": "person/{id}"},
        }],
    )


def _wait(what: str, done: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _envelopes(store: EventStore) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [json.loads(e) for e in conn.execute(select(events_table.c.envelope)).scalars()]


def _ssn_hash_of(envelopes: list[dict[str, Any]], person: int) -> str:
    found = {e["data"]["ssn"] for e in envelopes if e["type"] == TYPE and e["data"]["id"] == person}
    assert len(found) == 1, found
    return found.pop()


def _leaks(texts: list[str]) -> list[str]:
    return [f"{ssn} in {text[:200]!r}" for text in texts for ssn in FORBIDDEN if ssn in text]


class _Tap:
    """A queue of our own on an exchange, bound ``#`` (declared before the gateway publishes)."""

    def __init__(self, gw: Gateway, name: str, exchange: str) -> None:
        gw.bus.declare_queue(QueueSpec(name, {}, ((exchange, "#"),)))
        self.consumer: InMemoryConsumer = gw.bus.consumer(name, 1000)
        self.bodies: list[str] = []  # body and headers of every message, as text
        self.events: list[dict[str, Any]] = []  # the parsed bodies

    def drain(self) -> int:
        batch = self.consumer.get_batch(1000, 0.05, 0.0)
        for d in batch:
            self.bodies.append(bytes(d.body).decode() + " " + json.dumps(dict(d.headers), default=str))
            self.events.append(json.loads(d.body))
        self.consumer.ack(batch)
        return sum(1 for e in self.events if TYPE in e["type"] and "schema-changed" not in e["type"])


def test_a_configured_ssn_never_leaves_the_gateway_in_clear(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    store_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    _add(legacy, PEOPLE)
    accepted = len(PEOPLE) - 1
    settings = _settings(store_url, legacy)

    gw = Gateway(settings, roles=["sources", "relay", "scorer"])
    gw.bus.declare_topology()
    published = _Tap(gw, "redaction.events", gw.topology.events_exchange)
    scored = _Tap(gw, "redaction.scored", gw.topology.scored_exchange)
    gw.start()
    try:
        _wait("every accepted event published", lambda: published.drain() >= accepted)
        _wait("every accepted event scored", lambda: scored.drain() >= accepted)
        _wait("the contract's dead letter", lambda: len(gw.store.list_dead_letters()) == 1)

        app = create_app(settings, gw.store)
        _, token = gw.store.create_api_key("redaction", ["admin"], None, secret=key_secret(settings, gw.store))
        with TestClient(app, raise_server_exceptions=False) as client:
            auth = {"Authorization": f"Bearer {token}"}
            listed = client.get("/v1/events", params={"limit": 100}, headers=auth)
            assert listed.status_code == 200 and listed.json()["next_cursor"] is None
            ids = [item["id"] for item in listed.json()["items"]]
            singles = [client.get(f"/v1/events/{i}", headers=auth) for i in ids]
            dead_list = client.get("/v1/dead-letters", headers=auth)
            dead_ids = [d["id"] for d in dead_list.json()["items"]]
            dead_singles = [client.get(f"/v1/dead-letters/{i}", headers=auth) for i in dead_ids]
        responses = [listed, *singles, dead_list, *dead_singles]
        assert all(r.status_code == 200 for r in responses), [(r.request.url, r.status_code) for r in responses]
        assert len(singles) >= accepted and len(dead_singles) == 1
    finally:
        gw.stop()

    stored = _envelopes(gw.store)
    people = [e for e in stored if e["type"] == TYPE]
    assert len(people) == accepted and len(published.bodies) >= accepted and len(scored.bodies) >= accepted
    # Non-vacuous: each channel really carries the SSN field, as a 64-hex keyed hash.
    assert all(len(e["data"]["ssn"]) == 64 and int(e["data"]["ssn"], 16) >= 0 for e in people)
    assert _ssn_hash_of(published.events, 1) == _ssn_hash_of(people, 1)  # published as stored
    scored_originals = [e["data"]["event"] for e in scored.events if e["data"]["event"]["type"] == TYPE]
    assert len(scored_originals) >= accepted and _ssn_hash_of(scored_originals, 4) == _ssn_hash_of(people, 4)
    assert '"ssn"' in json.dumps(listed.json()) and "ssn" in dead_singles[0].text
    dead = gw.store.list_dead_letters()

    everything = (
        [json.dumps(e) for e in stored]
        + published.bodies
        + scored.bodies
        + [json.dumps([d.payload, d.reason, getattr(d, "headers", None)], default=str) for d in dead]
        + [r.text for r in responses]
        + [caplog.text]
        + [f"{r.getMessage()} {r.args!r} {r.__dict__!r}" for r in caplog.records]
    )
    assert caplog.records, "the run logs: the log check must not be vacuous"
    assert not _leaks(everything), _leaks(everything)[:5]

    # Stable: the same SSN, two events, one hash; other SSNs, other hashes.
    first = _ssn_hash_of(people, 1)
    assert first == _ssn_hash_of(people, 4)
    assert len({_ssn_hash_of(people, p) for p in (1, 2, 3, 5)}) == 4

    # After a restart with the same secret, a new row with that SSN gets the same hash ...
    _add(legacy, [(7, "Gus", "078-05-1120", "ACTIVE")], minute=10)
    _run_sources_until(settings, person=7)
    # ... and with another secret, another hash (and still not the SSN).
    _add(legacy, [(8, "Hal", "078-05-1120", "ACTIVE")], minute=20)
    _run_sources_until(_settings(store_url, legacy, OTHER_SECRET), person=8)
    later = _envelopes(gw.store)
    assert _ssn_hash_of(later, 7) == first
    assert _ssn_hash_of(later, 8) != first and len(_ssn_hash_of(later, 8)) == 64
    assert not _leaks([json.dumps(later), caplog.text])


def _run_sources_until(settings: Settings, person: int) -> None:
    gw = Gateway(settings, roles=["sources"])
    gw.start()
    try:
        _wait(f"person {person} stored", lambda: any(
            e["type"] == TYPE and e["data"]["id"] == person for e in _envelopes(gw.store)
        ))
    finally:
        gw.stop()
