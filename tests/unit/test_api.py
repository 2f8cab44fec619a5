"""REST API tests over a migrated SQLite store.

Tests taking the ``store`` fixture describe behaviour every store must show; the PostgreSQL suite
(``tests/integration/test_api_postgres.py``) imports and re-runs them against a real database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from gateway.api import create_app
from gateway.api.deps import decode_cursor, encode_cursor, get_store
from gateway.api.routers.events import gateway_event_id
from gateway.bus.protocols import BusHealth
from gateway.config import ApiSettings, Settings
from gateway.errors import StoreUnavailableError
from gateway.events import Event, parse_time
from gateway.store import EventFilter, EventStore, ScoreRecord, make_engine

PROBLEM = "application/problem+json"
SOURCE = "/tests/api"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
_DROP = object()


def ce(i: int = 0, **over: Any) -> dict[str, Any]:
    """A valid client CloudEvent; ``over`` replaces attributes (``_DROP`` removes one)."""
    obj: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"c-{i}",
        "source": SOURCE,
        "type": "com.example.thing.changed",
        "time": (T0 + timedelta(hours=i)).isoformat().replace("+00:00", "Z"),
        "subject": f"thing/{i}",
        "data": {"n": i, "name": f"thing {i}"},
    }
    obj.update(over)
    return {k: v for k, v in obj.items() if v is not _DROP}


def make_client(store: EventStore, settings: Settings | None = None, **kwargs: Any) -> TestClient:
    """A client of an app with ``api.auth`` off: these tests are about the routes, not about keys
    (tests/unit/test_api_auth.py covers authentication)."""
    settings = settings or Settings()
    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"auth": False})})
    app = create_app(settings, store, **kwargs)
    return TestClient(app, raise_server_exceptions=False)


def post(client: TestClient, body: Any, content_type: str = "application/json", **headers: str) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/events", content=raw, headers={"content-type": content_type, **headers})


def assert_problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    for key in ("type", "title", "status", "detail", "instance"):
        assert key in body, body
    assert body["status"] == status
    return body  # type: ignore[no-any-return]


def all_items(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    resp = client.get("/v1/events", params={"limit": 500, **params})
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]  # type: ignore[no-any-return]


@pytest.fixture
def store(sqlite_store: EventStore) -> EventStore:
    """The store under test (the PostgreSQL suite overrides this)."""
    return sqlite_store


@pytest.fixture
def client(store: EventStore) -> Iterator[TestClient]:
    """A client of an app with default settings over ``store``."""
    with make_client(store) as c:
        yield c


# ============================================================================ store behaviour
# (re-run against PostgreSQL by tests/integration/test_api_postgres.py)


def test_accept_one_event(client: TestClient) -> None:
    resp = post(client, ce(1), "application/cloudevents+json")
    assert resp.status_code == 202, resp.text
    gid = gateway_event_id(SOURCE, "c-1")
    assert resp.json() == {"accepted": [gid], "duplicates": [], "ids": [gid], "discarded": []}

    got = client.get(f"/v1/events/{gid}")
    assert got.status_code == 200
    rec = got.json()
    ev = rec["event"]
    assert ev["id"] == gid and ev["source"] == SOURCE and ev["type"] == "com.example.thing.changed"
    assert ev["clientid"] == "c-1" and ev["sourcename"] == "rest" and ev["sourceadapter"] == "rest-api"
    assert ev["data"] == {"n": 1, "name": "thing 1"} and ev["subject"] == "thing/1"
    assert parse_time(ev["time"]) == T0 + timedelta(hours=1)
    assert rec["lineage"] == {"source_name": "rest", "position": None, "adapter": "rest-api"}
    assert rec["delivery"]["status"] == "pending" and rec["delivery"]["attempts"] == 0
    assert rec["delivery"]["published_at"] is None and rec["delivery"]["accepted_at"].endswith("Z")
    assert rec["scores"] == []


def test_accept_batch_in_request_order(client: TestClient) -> None:
    batch = [ce(i) for i in range(3)]
    resp = post(client, batch, "application/cloudevents-batch+json")
    assert resp.status_code == 202, resp.text
    ids = [gateway_event_id(SOURCE, f"c-{i}") for i in range(3)]
    assert resp.json() == {"accepted": ids, "duplicates": [], "ids": ids, "discarded": []}
    assert [it["id"] for it in all_items(client)] == ids


def test_retry_is_idempotent(client: TestClient) -> None:
    batch = [ce(i) for i in range(3)]
    first = post(client, batch).json()
    again = post(client, batch)
    assert again.status_code == 202
    assert again.json() == {"accepted": [], "duplicates": first["ids"], "ids": first["ids"], "discarded": []}

    mixed = post(client, [ce(0), ce(9)]).json()
    assert mixed["accepted"] == [gateway_event_id(SOURCE, "c-9")]
    assert mixed["duplicates"] == [gateway_event_id(SOURCE, "c-0")]

    # The same client id from another source is another event.
    other = post(client, ce(0, source="/tests/other")).json()
    assert other["accepted"] == [gateway_event_id("/tests/other", "c-0")] != first["ids"][:1]
    assert len(all_items(client)) == 5


def test_get_includes_scores(client: TestClient, store: EventStore) -> None:
    gid = post(client, ce(1)).json()["ids"][0]
    scored_at = T0 + timedelta(days=1)
    store.save_scores(
        [
            ScoreRecord(
                event_id=gid, model_name="online-anomaly", model_version="1.2.0", score=0.93,
                explanation={"top": ["n"]}, event_type="com.example.thing.changed", source_name="rest",
                event_time=T0, scored_at=scored_at,
            )
        ]
    )
    rec = client.get(f"/v1/events/{gid}").json()
    assert len(rec["scores"]) == 1
    score = rec["scores"][0]
    assert score["score"] == pytest.approx(0.93)
    assert score["model"] == {"name": "online-anomaly", "version": "1.2.0"}
    assert score["explanation"] == {"top": ["n"]}
    assert parse_time(score["scored_at"]) == scored_at


def test_get_unknown_event_is_404_problem(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/events/no-such-id"), 404)
    assert "no-such-id" in body["detail"] and body["instance"] == "/v1/events/no-such-id"


def test_list_filters(client: TestClient, store: EventStore) -> None:
    ids = post(client, [ce(i, type="com.example.a" if i % 2 else "com.example.b") for i in range(6)]).json()["ids"]
    adapter_event = Event(
        id="adapter-1", source="/legacy/orders", type="com.example.a", time=T0, data={},
        extensions={"sourcename": "legacy-orders", "sourceposition": '{"row": 7}', "sourceadapter": "sql"},
    )
    store.accept([adapter_event], source_name="legacy-orders")
    store.save_scores(
        [
            ScoreRecord(gid, "m", "1", s, None, "t", "rest", T0, T0)
            for gid, s in ((ids[1], 0.9), (ids[2], 0.2), (ids[3], 0.75))
        ]
    )
    assert len(all_items(client)) == 7
    published = [row.seq for row in store.list_events(EventFilter(), limit=10) if row.event["id"] == ids[0]]
    store.mark_published(published)

    assert [it["id"] for it in all_items(client, source="rest")] == ids
    legacy = all_items(client, source="legacy-orders")
    assert [it["id"] for it in legacy] == ["adapter-1"]
    assert legacy[0]["lineage"] == {"source_name": "legacy-orders", "position": {"row": 7}, "adapter": "sql"}
    assert [it["id"] for it in all_items(client, type="com.example.b")] == ids[0::2]
    window = all_items(client, source="rest", time_from="2024-05-01T13:00:00Z", time_to="2024-05-01T15:00:00+00:00")
    assert [it["id"] for it in window] == ids[1:3]
    assert [it["id"] for it in all_items(client, min_score=0.7)] == [ids[1], ids[3]]
    assert [it["id"] for it in all_items(client, status="published")] == [ids[0]]
    assert ids[0] not in [it["id"] for it in all_items(client, status="pending")]
    pub = client.get(f"/v1/events/{ids[0]}").json()["delivery"]
    assert pub["status"] == "published" and pub["published_at"] is not None


def test_list_pagination_three_pages(client: TestClient) -> None:
    ids = post(client, [ce(i) for i in range(7)]).json()["ids"]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/events", params=params).json()
        pages += 1
        seen.extend(it["id"] for it in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert pages == 3
    assert seen == ids  # no overlap, no gap, acceptance order


def test_events_parse_with_cloudevents_sdk(client: TestClient) -> None:
    from cloudevents.core.formats.json import JSONFormat

    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    batch = [
        ce(1),
        ce(2, time=_DROP, subject=_DROP, priority=3, urgent=True, region="eu1"),
        ce(3, traceparent=tp, data="plain text", datacontenttype="text/plain"),
        ce(4, data=None, dataschema="https://example.com/schema/1"),
    ]
    ids = post(client, batch).json()["ids"]
    fmt = JSONFormat()
    for gid in ids:
        raw = client.get(f"/v1/events/{gid}").content
        event = json.loads(raw)["event"]
        parsed = fmt.read(None, json.dumps(event).encode())
        assert parsed.get_id() == gid
        assert parsed.get_extension("clientid") == event["clientid"]
        assert parsed.get_source() == SOURCE and parsed.get_time() is not None
    items = all_items(client)
    for it in items:
        fmt.read(None, json.dumps(it["event"]).encode())
    by_client = {it["event"]["clientid"]: it["event"] for it in items}
    assert by_client["c-2"]["priority"] == 3 and by_client["c-2"]["urgent"] is True
    assert by_client["c-3"]["traceparent"] == tp and by_client["c-3"]["data"] == "plain text"


def test_traceparent_header_is_kept(client: TestClient) -> None:
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ids = post(client, [ce(1), ce(2, traceparent=own)], traceparent=header).json()["ids"]
    assert client.get(f"/v1/events/{ids[0]}").json()["event"]["traceparent"] == header
    assert client.get(f"/v1/events/{ids[1]}").json()["event"]["traceparent"] == own


# ============================================================================ validation


@pytest.mark.parametrize(
    ("event", "loc"),
    [
        (ce(1, type=_DROP), ["body", "type"]),
        (ce(1, type=""), ["body", "type"]),
        (ce(1, time="yesterday"), ["body", "time"]),
        (ce(1, time=1714564800), ["body", "time"]),
        (ce(1, specversion="0.3"), ["body", "specversion"]),
        (ce(1, Bad_Ext="x"), ["body", "Bad_Ext"]),
        (ce(1, specVersion="1.0"), ["body", "specVersion"]),  # core-looking junk
        (ce(1, datacontent_type="x"), ["body", "datacontent_type"]),
        (ce(1, ext={"nested": 1}), ["body", "ext"]),
        (ce(1, ratio=0.5), ["body", "ratio"]),
        (ce(1, data_base64="AAAA"), ["body", "data_base64"]),
        (ce(1, subject=""), ["body", "subject"]),
        (ce(1, traceparent="not-a-trace"), ["body", "traceparent"]),
        ("just a string", ["body"]),
    ],
)
def test_invalid_event_is_422_naming_the_location(client: TestClient, event: Any, loc: list[Any]) -> None:
    body = assert_problem(post(client, event), 422)
    assert body["errors"][0]["loc"] == loc, body
    assert body["errors"][0]["msg"]
    assert all_items(client) == []


def test_invalid_batch_lists_every_error_and_accepts_nothing(client: TestClient) -> None:
    batch = [ce(0), ce(1, time="2024-13-45T00:00:00Z"), ce(2), {"specversion": "1.0"}, 7]
    body = assert_problem(post(client, batch), 422)
    locs = [e["loc"] for e in body["errors"]]
    assert locs == [["body", 1, "time"], ["body", 3, "id"], ["body", 4]]
    assert "body[1].time" in body["detail"]
    assert all_items(client) == []


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"specversion": "1.0", "id": ', "line 1 column 30"),
        (b'[{"a": 1},\n {"b": }]', "line 2 column 8"),
        (b'{"a": NaN}', "NaN"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[" * 100_000, "nested"),
    ],
)
def test_malformed_json_is_400_naming_the_position(client: TestClient, raw: bytes, fragment: str) -> None:
    body = assert_problem(post(client, raw), 400)
    assert fragment in body["detail"], body
    assert body["errors"][0]["loc"] == ["body"]


def test_content_type_and_shape_must_match(client: TestClient) -> None:
    assert_problem(post(client, ce(1), "text/plain"), 415)
    assert_problem(client.post("/v1/events", content=b"{}"), 415)
    assert_problem(post(client, [ce(1)], "application/cloudevents+json"), 422)
    assert_problem(post(client, ce(1), "application/cloudevents-batch+json"), 422)
    assert post(client, ce(1), "application/cloudevents+json; charset=utf-8").status_code == 202


def test_empty_batch_is_accepted_trivially(client: TestClient) -> None:
    assert post(client, []).json() == {"accepted": [], "duplicates": [], "ids": [], "discarded": []}


# ============================================================================ limits


def test_body_over_limit_is_413(client: TestClient, store: EventStore) -> None:
    big = json.dumps(ce(1, data={"blob": "x" * (2 * 1024 * 1024)})).encode()
    body = assert_problem(post(client, big), 413)
    assert "1048576" in body["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    resp = client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(resp, 413)
    assert store.list_events(EventFilter(), limit=10) == []


def test_batch_over_1000_events_is_413(client: TestClient) -> None:
    batch = [{"specversion": "1.0", "id": str(i), "source": "/s", "type": "t", "time": "2024-01-01T00:00:00Z"}
             for i in range(1001)]
    body = assert_problem(post(client, batch), 413)
    assert "1000" in body["detail"]
    assert post(client, batch[:1000]).status_code == 202


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 10000}, ["query", "limit"]),
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": "many"}, ["query", "limit"]),
        ({"cursor": "!!!"}, ["query", "cursor"]),
        ({"cursor": "YWJj"}, ["query", "cursor"]),  # base64url, but not a cursor
        ({"time_from": "2024-05-01"}, ["query", "time_from"]),
        ({"time_to": "2024-05-01T12:00:00"}, ["query", "time_to"]),  # no zone
        ({"time_from": "2024-05-02T00:00:00Z", "time_to": "2024-05-01T00:00:00Z"}, ["query", "time_from"]),
        ({"min_score": 1.5}, ["query", "min_score"]),
        ({"status": "lost"}, ["query", "status"]),
    ],
)
def test_bad_list_parameters_are_422(client: TestClient, params: dict[str, Any], loc: list[str]) -> None:
    body = assert_problem(client.get("/v1/events", params=params), 422)
    assert [e["loc"] for e in body["errors"]] == [loc], body


def test_page_size_follows_settings(store: EventStore) -> None:
    c = make_client(store, Settings(api=ApiSettings(max_page_size=5)))
    assert c.get("/v1/events", params={"limit": 5}).status_code == 200
    assert_problem(c.get("/v1/events", params={"limit": 6}), 422)


def test_cursor_round_trip() -> None:
    for seq in (0, 1, 99, 2**62):
        assert decode_cursor(encode_cursor(seq)) == seq
    for bad in ("", "=", "MTI=", "LTE", "x" * 100):  # padded, negative, too long
        with pytest.raises(ValueError):
            decode_cursor(bad)


def test_backlog_over_threshold_is_503_and_accepts_nothing(store: EventStore) -> None:
    store.accept(
        [Event(id=f"p{i}", source="/s", type="t", time=T0, data={}) for i in range(3)], source_name="legacy"
    )
    woken: list[int] = []
    c = make_client(store, Settings(api=ApiSettings(backlog_threshold=2)), on_accept=lambda: woken.append(1))
    body = assert_problem(post(c, ce(1)), 503)
    assert body["type"].endswith("backpressure")
    assert int(c.get("/readyz").status_code) == 200  # backpressure is not unreadiness
    assert int(post(c, ce(1)).headers["Retry-After"]) >= 1
    assert store.get_event(gateway_event_id(SOURCE, "c-1")) is None
    assert len(store.list_events(EventFilter(), limit=10)) == 3
    assert woken == []


class _FailingStore(EventStore):
    """A real store whose acceptance transaction fails (and whose error text holds a secret)."""

    def accept(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailableError("outbox transaction failed: postgresql://gw:hunter2@db:5432/gw refused")


def test_store_failure_is_503_and_accepts_nothing(sqlite_store: EventStore) -> None:
    woken: list[int] = []
    c = make_client(_FailingStore(sqlite_store.engine), on_accept=lambda: woken.append(1))
    resp = post(c, [ce(1), ce(2)])
    body = assert_problem(resp, 503)
    assert body["type"].endswith("store-unavailable")
    assert "Retry-After" in resp.headers and "hunter2" not in resp.text and "postgresql" not in resp.text
    assert sqlite_store.list_events(EventFilter(), limit=10) == []
    assert woken == []


def test_unreachable_database_is_503(tmp_path: Any) -> None:
    broken = EventStore(make_engine(f"sqlite:///{tmp_path}/missing/dir/gateway.db"))
    c = make_client(broken)
    assert_problem(post(c, ce(1)), 503)
    assert_problem(c.get("/v1/events"), 503)
    assert_problem(c.get("/v1/events/x"), 503)
    assert c.get("/healthz").status_code == 200
    body = assert_problem(c.get("/readyz"), 503)
    assert body["checks"]["store"]["ok"] is False
    metrics = c.get("/metrics")
    assert metrics.status_code == 200 and "gateway_store_up 0.0" in metrics.text


def test_on_accept_runs_after_commit_only_for_new_events(store: EventStore) -> None:
    calls: list[int] = []

    def wake() -> None:
        calls.append(len(store.list_events(EventFilter(), limit=100)))  # events are visible: committed

    c = make_client(store, on_accept=wake)
    post(c, [ce(1), ce(2)])
    post(c, [ce(1), ce(2)])  # all duplicates: nothing to relay
    assert calls == [2]


def test_on_accept_failure_does_not_fail_the_request(store: EventStore) -> None:
    def boom() -> None:
        raise RuntimeError("relay gone")

    c = make_client(store, on_accept=boom)
    assert post(c, ce(1)).status_code == 202


# ============================================================================ health, metrics, errors


class _FakeBus:
    kind = "fake"

    def __init__(self, ok: bool, detail: str = "") -> None:
        self._health = BusHealth(ok=ok, kind=self.kind, detail=detail)

    def health(self) -> BusHealth:
        return self._health


def test_healthz_and_readyz(store: EventStore) -> None:
    assert make_client(store).get("/healthz").json() == {"status": "ok"}
    ready = make_client(store, bus=_FakeBus(True)).get("/readyz")  # type: ignore[arg-type]
    assert ready.status_code == 200
    assert ready.json()["checks"]["store"]["ok"] and ready.json()["checks"]["bus"]["ok"]

    bus = _FakeBus(False, "connection to amqp://gw:hunter2@rabbit:5672/%2F refused, password=hunter2")
    down = make_client(store, bus=bus).get("/readyz")  # type: ignore[arg-type]
    body = assert_problem(down, 503)
    assert body["checks"]["store"]["ok"] is True and body["checks"]["bus"]["ok"] is False
    assert "hunter2" not in down.text and "amqp://" not in down.text


def test_readyz_does_not_leak_database_url() -> None:
    broken = EventStore(make_engine("postgresql+psycopg://gw:hunter2@127.0.0.1:1/gateway"))
    resp = make_client(broken).get("/readyz")
    body = assert_problem(resp, 503)
    assert body["checks"]["store"]["ok"] is False
    assert "hunter2" not in resp.text and "127.0.0.1" not in resp.text


def test_metrics(store: EventStore) -> None:
    registry = CollectorRegistry()
    c = make_client(store, registry=registry)
    other = make_client(store)  # a second app in the same process must not clash
    post(c, [ce(1), ce(2)])
    post(c, [ce(2), ce(3)])
    post(c, b"not json")
    text = c.get("/metrics").text
    assert "gateway_api_events_accepted_total 3.0" in text
    assert "gateway_api_events_duplicate_total 1.0" in text
    assert 'gateway_api_ingest_rejected_total{reason="invalid-json"} 1.0' in text
    assert "gateway_outbox_pending 3.0" in text
    assert registry.get_sample_value("gateway_api_events_accepted_total") == 3.0
    other_text = other.get("/metrics").text
    assert "gateway_api_events_accepted_total 0.0" in other_text and "gateway_outbox_pending 3.0" in other_text


def test_errors_are_problem_json(store: EventStore) -> None:
    c = make_client(store)
    assert_problem(c.get("/v1/nowhere"), 404)
    resp = c.delete("/v1/events")
    assert_problem(resp, 405)
    assert "POST" in resp.headers["allow"]


def test_500_does_not_leak_exception_text(store: EventStore) -> None:
    class Exploding:
        def get_event(self, event_id: str) -> None:
            raise RuntimeError("secret hunter2 in the message")

    app: FastAPI = create_app(Settings(api=ApiSettings(auth=False)), store)
    app.dependency_overrides[get_store] = lambda: Exploding()
    resp = TestClient(app, raise_server_exceptions=False).get("/v1/events/x")
    body = assert_problem(resp, 500)
    assert "hunter2" not in resp.text and "RuntimeError" not in resp.text
    assert body["instance"] == "/v1/events/x"


def test_openapi(store: EventStore) -> None:
    spec = make_client(store).get("/openapi.json").json()
    assert spec["info"]["title"] == "legacy-gateway API" and spec["info"]["version"]
    paths = set(spec["paths"])
    assert {"/v1/events", "/v1/events/{event_id}", "/healthz", "/readyz", "/metrics"} <= paths
    assert all(p.startswith("/v1/") or p in {"/healthz", "/readyz", "/metrics"} for p in paths)
    body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/cloudevents+json", "application/cloudevents-batch+json"} <= set(body)
