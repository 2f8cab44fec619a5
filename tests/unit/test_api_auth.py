"""API keys, scopes, source restrictions, limits and the audit log of the REST API (issue 8).

Tests taking the ``store`` fixture run on SQLite here and on PostgreSQL in
``tests/integration/test_api_postgres.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

import gateway.api.auth as auth_module
from gateway.api import create_app
from gateway.api.auth import key_secret
from gateway.api.limits import KeyRateLimiter
from gateway.cli import app as cli_app
from gateway.config import ApiSettings, Settings, load_settings
from gateway.errors import ConfigurationError
from gateway.events import Event
from gateway.store import Actor, EventStore, ScoreRecord
from gateway.store.keys import token_digest
from gateway.store.schema import metadata
from tests.unit.test_api import T0, assert_problem, ce, post

SECRET = "k" * 40


def settings(**api: Any) -> Settings:
    return Settings(profile="test", api={"key_secret": SECRET, **api})


def client_of(store: EventStore, cfg: Settings | None = None) -> TestClient:
    return TestClient(create_app(cfg or settings(), store), raise_server_exceptions=False)


def new_key(store: EventStore, scopes: list[str], sources: list[str] | None = None, cfg: Settings | None = None) -> str:
    _, token = store.create_api_key("t", scopes, sources, secret=key_secret(cfg or settings(), store))
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def seed_events(store: EventStore) -> dict[str, list[str]]:
    """Events of three gateway sources, interleaved in acceptance order."""
    ids: dict[str, list[str]] = {"orders": [], "billing": [], "rest": []}
    for i in range(9):
        source = ("orders", "billing", "rest")[i % 3]
        ev = Event.from_dict(ce(i, id=f"{source}-{i}"))
        store.accept([ev], source_name=source)
        ids[source].append(ev.id)
    return ids


@pytest.fixture
def store(sqlite_store: EventStore) -> EventStore:
    """The store under test (the PostgreSQL suite overrides this)."""
    return sqlite_store


# ---------------------------------------------------------------------------- 401
def test_missing_key_is_401_with_bearer_challenge(store: EventStore) -> None:
    resp = client_of(store).get("/v1/events")
    body = assert_problem(resp, 401)
    assert resp.headers["www-authenticate"] == 'Bearer realm="legacy-gateway"'
    assert "API key" in body["detail"]


@pytest.mark.parametrize("header", [
    "Basic dXNlcjpwdw==", "Bearer", "Bearer not-a-key", "Bearer gw_0123456789abcdef_short", "gw_0123456789abcdef_x",
])
def test_malformed_key_is_401(store: EventStore, header: str) -> None:
    resp = client_of(store).get("/v1/events", headers={"Authorization": header})
    assert_problem(resp, 401)
    assert resp.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]


def test_unknown_key_and_wrong_secret_are_401(store: EventStore) -> None:
    token = new_key(store, ["events:read"])
    key_id = token.split("_")[1]
    forged = f"gw_{key_id}_{'A' * 43}"  # a known id with a wrong secret
    unknown = f"gw_{'f' * 16}_{'A' * 43}"
    c = client_of(store)
    for t in (forged, unknown):
        body = assert_problem(c.get("/v1/events", headers=bearer(t)), 401)
        assert body["detail"] == "unknown API key"
    # The same token is unknown under another server secret.
    other = client_of(store, settings(key_secret="z" * 40))
    assert_problem(other.get("/v1/events", headers=bearer(token)), 401)
    assert c.get("/v1/events", headers=bearer(token)).status_code == 200


def test_revoked_key_is_401_at_once(store: EventStore) -> None:
    admin = new_key(store, ["admin"])
    token = new_key(store, ["events:read"])
    c = client_of(store)
    assert c.get("/v1/events", headers=bearer(token)).status_code == 200
    key_id = token.split("_")[1]
    resp = c.delete(f"/v1/keys/{key_id}", headers=bearer(admin))
    assert resp.status_code == 200 and resp.json()["revoked_at"]
    body = assert_problem(c.get("/v1/events", headers=bearer(token)), 401)
    assert "revoked" in body["detail"]
    # Revoking again changes nothing and writes no second audit row; an unknown id is a 404.
    assert c.delete(f"/v1/keys/{key_id}", headers=bearer(admin)).status_code == 200
    assert [a.action for a in store.list_audit(action="key.revoke")] == ["key.revoke"]
    assert_problem(c.delete("/v1/keys/nope", headers=bearer(admin)), 404)


# ---------------------------------------------------------------------------- 403 and the route matrix
#: Every /v1 route with the scope it needs and a request that reaches it.
ROUTES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("post", "/v1/events", "events:write", {"json": ce(1)}),
    ("get", "/v1/events", "events:read", {}),
    ("get", "/v1/events/{event_id}", "events:read", {}),
    ("get", "/v1/scoring/models", "events:read", {}),
    ("get", "/v1/events/stream", "events:read", {}),
    ("get", "/v1/sources", "sources:admin", {}),
    ("get", "/v1/sources/{name}", "sources:admin", {}),
    ("post", "/v1/sources/{name}/pause", "sources:admin", {}),
    ("post", "/v1/sources/{name}/resume", "sources:admin", {}),
    ("post", "/v1/sources/{name}/run", "sources:admin", {}),
    ("get", "/v1/sources/{name}/cursor", "sources:admin", {}),
    ("put", "/v1/sources/{name}/cursor", "sources:admin", {"json": {"cursor": None}}),
    ("delete", "/v1/sources/{name}/cursor", "sources:admin", {}),
    ("get", "/v1/scoring/compare", "events:read", {"params": {"shadow": "s"}}),
    ("get", "/v1/dead-letters", "admin", {}),
    ("get", "/v1/dead-letters/{dead_letter_id}", "admin", {}),
    ("delete", "/v1/dead-letters/{dead_letter_id}", "admin", {}),
    ("post", "/v1/dead-letters/replay", "admin", {"json": {"ids": [1], "dry_run": True}}),
    ("post", "/v1/dead-letters/delete", "admin", {"json": {"ids": [1], "confirm": 0}}),
    ("post", "/v1/keys", "admin", {"json": {"name": "x", "scopes": ["events:read"]}}),
    ("get", "/v1/keys", "admin", {}),
    ("delete", "/v1/keys/{key_id}", "admin", {}),
    ("get", "/v1/audit", "admin", {}),
]


def _url(path: str, event_id: str) -> str:
    return path.format(event_id=event_id, dead_letter_id=999, key_id="0000000000000000", name="orders")


def test_route_matrix_covers_every_v1_route(store: EventStore) -> None:
    spec = client_of(store).get("/openapi.json").json()
    documented = {(m, p) for p, ops in spec["paths"].items() if p.startswith("/v1/") for m in ops}
    assert documented == {(m, p) for m, p, _, _ in ROUTES}
    assert "ApiKey" in spec["components"]["securitySchemes"]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client_of(store).get(path).status_code == 200, path


def test_route_matrix_no_key_401_wrong_scope_403_other_source_404(store: EventStore) -> None:
    ids = seed_events(store)
    c = client_of(store)
    other_event = ids["billing"][0]
    for method, path, scope, kwargs in ROUTES:
        url = _url(path, other_event)
        assert_problem(c.request(method, url, **kwargs), 401)
        lacking = [s for s in ("events:read", "events:write", "sources:admin") if s != scope]
        resp = c.request(method, url, headers=bearer(new_key(store, lacking)), **kwargs)
        body = assert_problem(resp, 403)
        assert scope in body["detail"], (method, path)
        assert f'scope="{scope}"' in resp.headers["www-authenticate"]
    # A key limited to another source: the event does not exist for it.
    orders_only = bearer(new_key(store, ["events:read"], ["orders"]))
    hidden = c.get(f"/v1/events/{other_event}", headers=orders_only)
    missing = c.get("/v1/events/no-such-event", headers=orders_only)
    assert_problem(hidden, 404) and assert_problem(missing, 404)
    assert hidden.json()["detail"] == f"no event with id {other_event!r}"
    assert c.get(f"/v1/events/{ids['orders'][0]}", headers=orders_only).status_code == 200


def test_admin_implies_every_scope(store: EventStore) -> None:
    ids = seed_events(store)
    c = client_of(store)
    admin = bearer(new_key(store, ["admin"]))
    assert c.get(f"/v1/events/{ids['billing'][0]}", headers=admin).status_code == 200
    assert c.post("/v1/events", json=ce(50), headers=admin).status_code == 202
    assert c.get("/v1/dead-letters", headers=admin).status_code == 200


# ---------------------------------------------------------------------------- source restrictions
def test_lists_are_filtered_to_the_allowed_sources_across_pages(store: EventStore) -> None:
    ids = seed_events(store)
    c = client_of(store)
    two = bearer(new_key(store, ["events:read"], ["orders", "billing"]))
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = c.get("/v1/events", params=params, headers=two).json()
        assert len(page["items"]) <= 2
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    expected = [i for pair in zip(ids["orders"], ids["billing"], strict=True) for i in pair]
    assert seen == expected  # acceptance order, both sources, nothing of "rest"
    one = bearer(new_key(store, ["events:read"], ["orders"]))
    assert [i["id"] for i in c.get("/v1/events", headers=one).json()["items"]] == ids["orders"]
    assert c.get("/v1/events", params={"source": "billing"}, headers=one).json() == {"items": [], "next_cursor": None}
    only = c.get("/v1/events", params={"source": "orders"}, headers=one).json()["items"]
    assert [i["id"] for i in only] == ids["orders"]


def test_ingest_into_another_source_is_403(store: EventStore) -> None:
    c = client_of(store)
    orders_writer = bearer(new_key(store, ["events:write"], ["orders"]))
    body = assert_problem(post(c, ce(1), **orders_writer), 403)
    assert "'rest'" in body["detail"]
    assert c.get("/v1/events", headers=bearer(new_key(store, ["admin"]))).json()["items"] == []  # nothing stored
    rest_writer = bearer(new_key(store, ["events:write"], ["rest"]))
    assert post(c, ce(1), **rest_writer).status_code == 202


def test_scoring_compare_needs_an_unrestricted_key(store: EventStore) -> None:
    store.save_scores([ScoreRecord("e", "m", "1", 0.5, None, "t", "orders", T0, T0)])
    c = client_of(store)
    restricted = c.get("/v1/scoring/compare", params={"primary": "m", "shadow": "s"},
                       headers=bearer(new_key(store, ["events:read"], ["orders"])))
    assert "limited to some sources" in assert_problem(restricted, 403)["detail"]
    full = c.get("/v1/scoring/compare", params={"primary": "m", "shadow": "s"},
                 headers=bearer(new_key(store, ["events:read"])))
    assert full.status_code == 200, full.text


# ---------------------------------------------------------------------------- limits
def test_body_cap_413_page_cap_422_unknown_field_422(store: EventStore) -> None:
    c = client_of(store, settings(max_body_bytes=2048, max_page_size=5))
    admin = bearer(new_key(store, ["admin"]))
    big = json.dumps(ce(1, data={"x": "y" * 4000}))
    assert_problem(c.post("/v1/events", content=big, headers={**admin, "content-type": "application/json"}), 413)
    body = assert_problem(c.get("/v1/events", params={"limit": 6}, headers=admin), 422)
    assert body["errors"][0]["loc"] == ["query", "limit"]
    body = assert_problem(c.post("/v1/keys", json={"name": "x", "scopes": ["admin"], "role": "root"}, headers=admin), 422)
    assert body["errors"][0]["loc"] == ["body", "role"]
    body = assert_problem(c.post("/v1/dead-letters/replay", json={"ids": [1], "force": True}, headers=admin), 422)
    assert body["errors"][0]["loc"] == ["body", "force"]


def test_key_fields_are_validated(store: EventStore) -> None:
    c = client_of(store)
    admin = bearer(new_key(store, ["admin"]))
    cases = [
        ({"name": "x", "scopes": ["events:delete"]}, "scopes", "events:delete"),
        ({"name": "x", "scopes": ["admin"], "sources": ["orders"]}, "sources", "admin"),
        ({"name": "x\n", "scopes": ["admin"]}, "name", "letters"),
    ]
    for req, field, word in cases:
        body = assert_problem(c.post("/v1/keys", json=req, headers=admin), 422)
        assert body["errors"][0]["loc"] == ["body", field] and word in body["errors"][0]["msg"], body


def test_rate_limit_per_key_is_429_with_retry_after(store: EventStore) -> None:
    c = client_of(store, settings(rate_limit_per_second=0.01, rate_limit_burst=2))
    first, second = bearer(new_key(store, ["events:read"])), bearer(new_key(store, ["events:read"]))
    assert [c.get("/v1/events", headers=first).status_code for _ in range(2)] == [200, 200]
    resp = c.get("/v1/events", headers=first)
    body = assert_problem(resp, 429)
    assert resp.headers["retry-after"] == "100"  # one token at 0.01 per second
    assert "rate limit" in body["detail"]
    assert c.get("/v1/events", headers=second).status_code == 200  # per key
    assert c.get("/healthz").status_code == 200
    unlimited = client_of(store, settings(rate_limit_per_second=0, rate_limit_burst=1))
    assert {unlimited.get("/v1/events", headers=first).status_code for _ in range(5)} == {200}


def test_token_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    bucket = KeyRateLimiter(2.0, 3, clock=lambda: now[0])
    assert [bucket.acquire("k") for _ in range(3)] == [None, None, None]
    assert bucket.acquire("k") == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.acquire("k") is None and bucket.acquire("k") == pytest.approx(0.5)
    now[0] = 100.0  # refills up to the burst, not beyond
    assert [bucket.acquire("k") for _ in range(4)][-1] == pytest.approx(0.5)
    assert bucket.acquire("other") is None


# ---------------------------------------------------------------------------- storage and comparison
def test_only_a_digest_is_stored(store: EventStore) -> None:
    c = client_of(store)
    admin = new_key(store, ["admin"])
    resp = c.post("/v1/keys", json={"name": "partner", "scopes": ["events:read"], "sources": ["orders"]},
                  headers=bearer(admin))
    assert resp.status_code == 201, resp.text
    created = resp.json()
    token = created["token"]
    assert token.startswith(f"gw_{created['id']}_") and "digest" not in created
    dump = []
    with store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            dump += [repr(tuple(row)) for row in conn.execute(select(table))]
    text = "\n".join(dump)
    for t in (token, admin):
        assert t not in text and t.split("_", 2)[2] not in text  # the secret part may itself hold "_"
    assert token_digest(SECRET.encode(), token) in text
    listed = c.get("/v1/keys", headers=bearer(admin)).json()["items"]
    assert {k["id"] for k in listed} == {created["id"], admin.split("_")[1]}
    assert all("token" not in k and "digest" not in k for k in listed)
    assert "digest" not in repr(store.list_api_keys())
    assert c.get("/v1/events", headers=bearer(token)).status_code == 200
    assert store.get_api_key(created["id"]).last_used_at is not None  # type: ignore[union-attr]


def test_tokens_are_compared_in_constant_time(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = auth_module.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    token = new_key(store, ["events:read"])
    c = client_of(store)
    assert c.get("/v1/events", headers=bearer(token)).status_code == 200
    assert calls == [(token_digest(SECRET.encode(), token),) * 2]
    assert c.get("/v1/events", headers=bearer(f"gw_{'e' * 16}_{'B' * 43}")).status_code == 401
    assert len(calls) == 2  # an unknown id is compared too (against a dummy digest)


# ---------------------------------------------------------------------------- settings
def test_auth_off_only_in_dev_and_test(store: EventStore) -> None:
    off = client_of(store, Settings(profile="dev", api={"auth": False}))
    assert off.get("/v1/keys").status_code == 200
    with pytest.raises(ValueError, match="api.auth: profile prod requires API keys"):
        Settings(profile="prod", api={"auth": False})


def test_prod_needs_a_key_secret_and_dev_generates_one_per_store(store: EventStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="api.key_secret: profile prod requires"):
        create_app(Settings(profile="prod"), store)
    with pytest.raises(ValueError, match="at least 32 characters"):
        ApiSettings(key_secret="short")
    prod = Settings(profile="prod", api={"key_secret": SECRET})
    assert SECRET not in repr(prod) and SECRET not in str(prod.model_dump())
    dev = Settings(profile="dev")
    assert key_secret(dev, store) == key_secret(dev, store) == store.local_key_secret()
    assert len(store.local_key_secret()) == 32
    token = new_key(store, ["events:read"], cfg=dev)
    assert client_of(store, dev).get("/v1/events", headers=bearer(token)).status_code == 200
    cfg = tmp_path / "g.yaml"
    cfg.write_text(f"profile: prod\napi:\n  key_secret: {SECRET}\n")
    with pytest.raises(ConfigurationError, match="api.key_secret: a secret must come from the environment"):
        load_settings(cfg)


# ---------------------------------------------------------------------------- CLI and audit
def _cli(tmp_path: Path, *args: str) -> Any:
    cfg = tmp_path / "gateway.yaml"
    if not cfg.exists():
        cfg.write_text(f"profile: test\nstore:\n  url: sqlite:///{tmp_path / 'cli.db'}\n")
    return CliRunner().invoke(cli_app, [*args, "--config", str(cfg)])


def test_keys_cli_prints_the_token_once_lists_and_revokes(tmp_path: Path) -> None:
    made = _cli(tmp_path, "keys", "create", "--name", "etl", "--scope", "events:read", "--source", "orders",
                "--source", "billing")
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    key_id = token.split("_")[1]
    assert token.startswith("gw_") and f"created key {key_id} (etl)" in made.stdout
    listed = _cli(tmp_path, "keys", "list")
    assert listed.exit_code == 0 and key_id in listed.stdout and "billing,orders" in listed.stdout
    assert token not in listed.stdout and token.split("_", 2)[2] not in listed.stdout
    as_json = json.loads(_cli(tmp_path, "keys", "list", "--json").stdout)
    assert as_json["sources"] == ["billing", "orders"] and "digest" not in as_json
    # The API on the same store accepts it (the dev/test secret lives in the store).
    cfg = load_settings(tmp_path / "gateway.yaml")
    from gateway.store import engine_from_settings

    engine = engine_from_settings(cfg.store)
    try:
        store = EventStore(engine)
        c = client_of(store, cfg)
        assert c.get("/v1/events", headers=bearer(token)).status_code == 200
        assert _cli(tmp_path, "keys", "revoke", key_id).exit_code == 0
        assert_problem(c.get("/v1/events", headers=bearer(token)), 401)
        audit = _cli(tmp_path, "audit", "list", "--json")
        rows = [json.loads(line) for line in audit.stdout.splitlines()]
        assert [(r["action"], r["target"]) for r in rows] == [("key.create", key_id), ("key.revoke", key_id)]
        assert all(r["actor_name"].startswith("cli:") and r["actor_id"] is None for r in rows)
        assert token not in audit.stdout
    finally:
        engine.dispose()
    bad = _cli(tmp_path, "keys", "create", "--name", "x", "--scope", "events:delete")
    assert bad.exit_code == 2 and "--scope: unknown scope(s) 'events:delete'" in bad.output
    assert _cli(tmp_path, "keys", "revoke", "nope").exit_code == 1
    assert _cli(tmp_path, "audit", "list", "--action", "nope").exit_code == 2


def test_admin_actions_are_audited_and_paged(store: EventStore) -> None:
    c = client_of(store)
    admin_token = new_key(store, ["admin"])
    admin = bearer(admin_token)
    admin_id = admin_token.split("_")[1]
    ev = Event.from_dict(ce(7))
    replayable = store.add_dead_letter(stage="broker", error_class="delivery_limit", reason="r",
                                       payload=ev.to_json().decode(), event_id=ev.id, source_name="orders")
    doomed = store.add_dead_letter(stage="source", error_class="X", reason="r", payload="{}", source_name="orders")
    made = c.post("/v1/keys", json={"name": "n", "scopes": ["events:read"]}, headers=admin).json()
    assert c.delete(f"/v1/keys/{made['id']}", headers=admin).status_code == 200
    dry = c.post("/v1/dead-letters/replay", json={"ids": [replayable], "dry_run": True}, headers=admin)
    assert dry.status_code == 200
    assert c.post("/v1/dead-letters/replay", json={"ids": [replayable]}, headers=admin).json()["replayed"] == 1
    assert c.delete(f"/v1/dead-letters/{doomed}", headers=admin).status_code == 204
    entries: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = c.get("/v1/audit", params={"limit": 1, **({"cursor": cursor} if cursor else {})}, headers=admin).json()
        entries += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [(e["action"], e["target"]) for e in entries] == [
        ("key.create", made["id"]), ("key.revoke", made["id"]),
        ("dead_letters.replay", "dead-letters:1"), ("dead_letters.delete", f"dead-letter:{doomed}"),
    ]  # the dry run is not an action
    assert {(e["actor_id"], e["actor_name"]) for e in entries} == {(admin_id, "t")}
    assert entries[2]["details"]["replayed"] == [replayable]
    assert made["token"] not in json.dumps(entries)
    only = c.get("/v1/audit", params={"action": "key.revoke"}, headers=admin).json()["items"]
    assert [e["action"] for e in only] == ["key.revoke"]
    assert_problem(c.get("/v1/audit", params={"action": "drop.table"}, headers=admin), 422)


def test_audit_actor_with_auth_off_is_anonymous(store: EventStore) -> None:
    c = client_of(store, Settings(profile="test", api={"auth": False}))
    assert c.post("/v1/keys", json={"name": "n", "scopes": ["admin"]}).status_code == 201
    assert [(a.actor_id, a.actor_name) for a in store.list_audit()] == [(None, "anonymous")]
    store.record_audit(Actor("k", "x"), "source.cursor.set", "orders", {"after": 1})
    with pytest.raises(ValueError, match="unknown audit action"):
        store.record_audit(Actor("k", "x"), "rm -rf", None, None)


@pytest.mark.parametrize(("method", "path"), [
    ("post", "/v1/keys"), ("post", "/v1/dead-letters/replay"), ("post", "/v1/dead-letters/delete"),
    ("put", "/v1/sources/orders/cursor"),
])
def test_no_key_is_401_even_with_a_body_that_is_not_json(method: str, path: str, sqlite_store: EventStore) -> None:
    """FastAPI validates a route's body before its dependencies: the auth gate answers first."""
    from gateway.api import create_app

    client = TestClient(create_app(Settings(profile="test"), sqlite_store), raise_server_exceptions=False)
    resp = client.request(method, path, content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")
    assert resp.headers["content-type"].startswith("application/problem+json")
