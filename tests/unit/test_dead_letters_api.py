"""``/v1/dead-letters``: list, get, replay and delete over a migrated SQLite store (TestClient)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from gateway.config import Settings
from gateway.store import EventStore
from tests.unit.test_api import assert_problem, make_client
from tests.unit.test_dead_letter_replay import (
    MAPPING_V2,
    make_event,
    outbox,
    park_record,
    publish_all,
    scoring_dead_letter,
    settings_with,
)


def seed(store: EventStore) -> dict[str, int]:
    stored, fresh = make_event(1), make_event(2)
    store.accept([stored], source_name="orders")
    publish_all(store)
    return {
        "scoring": scoring_dead_letter(store, stored),
        "broker": store.add_dead_letter(stage="broker", error_class="delivery_limit", reason="limit",
                                        payload=fresh.to_json().decode(), event_id=fresh.id, source_name="orders",
                                        headers={"x-death": [{"reason": "delivery_limit", "count": 1}]}, attempts=6),
        "record": park_record(store, {"order_no": 3, "rev": "r3"}, {"ts": "t3", "key": 3}),
        "failure": store.add_dead_letter(stage="source", source_name="orders", error_class="SoapFaultError",
                                         reason="fault", payload='{"cursor": {"page": 4}, "error": {"class": "x"}}'),
    }


def client_for(store: EventStore, settings: Settings | None = None, **kw: Any) -> TestClient:
    return make_client(store, settings or settings_with(MAPPING_V2), **kw)


def test_list_filters_state_and_cursor_paging(sqlite_store: EventStore) -> None:
    dl = seed(sqlite_store)
    client = client_for(sqlite_store)
    resp = client.get("/v1/dead-letters")
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert [i["id"] for i in items] == sorted(dl.values()) and resp.json()["next_cursor"] is None
    assert items[0]["state"] == "open" and "payload" not in items[0] and items[0]["replay_count"] == 0

    assert [i["id"] for i in client.get("/v1/dead-letters", params={"stage": "source"}).json()["items"]] == [
        dl["record"], dl["failure"]]
    assert [i["id"] for i in client.get("/v1/dead-letters", params={"error_class": "delivery_limit"}).json()["items"]] == [
        dl["broker"]]

    page1 = client.get("/v1/dead-letters", params={"limit": 3}).json()
    page2 = client.get("/v1/dead-letters", params={"limit": 3, "cursor": page1["next_cursor"]}).json()
    assert [i["id"] for i in page1["items"] + page2["items"]] == sorted(dl.values())
    assert page2["next_cursor"] is None

    sqlite_store.replay_dead_letter(dl["scoring"], event_ids=[make_event(1).id])
    assert [i["id"] for i in client.get("/v1/dead-letters", params={"state": "replayed"}).json()["items"]] == [dl["scoring"]]
    assert len(client.get("/v1/dead-letters", params={"state": "open"}).json()["items"]) == 3

    assert_problem(client.get("/v1/dead-letters", params={"state": "closed"}), 422)
    body = assert_problem(client.get("/v1/dead-letters", params={"limit": 10_000}), 422)
    assert body["errors"][0]["loc"] == ["query", "limit"]  # capped by api.max_page_size
    assert_problem(client.get("/v1/dead-letters", params={"cursor": "nonsense!"}), 422)


def test_get_one_with_payload_headers_position_and_replay_info(sqlite_store: EventStore) -> None:
    dl = seed(sqlite_store)
    client = client_for(sqlite_store)
    broker = client.get(f"/v1/dead-letters/{dl['broker']}").json()
    assert broker["stage"] == "broker" and broker["attempts"] == 6 and broker["error_class"] == "delivery_limit"
    assert broker["headers"]["x-death"][0]["reason"] == "delivery_limit" and broker["payload"].startswith("{")
    record = client.get(f"/v1/dead-letters/{dl['record']}").json()
    assert record["position"] == {"ts": "t3", "key": 3} and record["source_name"] == "orders"
    assert client.get(f"/v1/dead-letters/{dl['failure']}").json()["position"] == {"page": 4}

    client.post("/v1/dead-letters/replay", json={"ids": [dl["record"]]})
    replayed = client.get(f"/v1/dead-letters/{dl['record']}").json()
    assert replayed["state"] == "replayed" and replayed["replay_count"] == 1
    assert replayed["last_replay_outcome"] == "accepted" and replayed["replayed_at"].endswith("Z")
    assert replayed["event_id"] in replayed["last_replay_detail"]

    assert "no dead letter with id 999" in assert_problem(client.get("/v1/dead-letters/999"), 404)["detail"]
    assert_problem(client.get("/v1/dead-letters/0"), 422)


def test_replay_by_ids_reports_every_outcome_and_wakes_the_relay(sqlite_store: EventStore) -> None:
    dl = seed(sqlite_store)
    woken: list[int] = []
    client = client_for(sqlite_store, on_accept=lambda: woken.append(1))
    resp = client.post("/v1/dead-letters/replay", json={"ids": [dl["scoring"], dl["broker"], dl["record"], dl["failure"], 999]})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert (out["replayed"], out["requeued"], out["accepted"], out["skipped"], out["failed"]) == (3, 1, 2, 0, 2)
    assert out["not_found"] == [999] and out["dry_run"] is False
    by_id = {i["id"]: i for i in out["items"]}
    assert by_id[dl["scoring"]]["outcome"] == "requeued" and by_id[dl["broker"]]["outcome"] == "accepted"
    assert by_id[dl["record"]]["outcome"] == "accepted"
    assert by_id[dl["failure"]]["outcome"] == "failed" and "gateway sources resume orders" in by_id[dl["failure"]]["detail"]
    assert woken == [1]
    assert len(outbox(sqlite_store)) == 3

    again = client.post("/v1/dead-letters/replay", json={"ids": [dl["scoring"], dl["broker"]]}).json()
    assert (again["replayed"], again["skipped"]) == (0, 2) and len(outbox(sqlite_store)) == 3
    forced = client.post("/v1/dead-letters/replay", json={"ids": [dl["broker"]], "again": True}).json()
    assert forced["requeued"] == 1 and len(outbox(sqlite_store)) == 3


def test_replay_by_filter_and_dry_run(sqlite_store: EventStore) -> None:
    dl = seed(sqlite_store)
    client = client_for(sqlite_store)
    preview = client.post("/v1/dead-letters/replay", json={"filter": {"stage": "source"}, "dry_run": True}).json()
    assert preview["dry_run"] and [(i["id"], i["outcome"]) for i in preview["items"]] == [
        (dl["record"], "accepted"), (dl["failure"], "failed")]
    assert len(outbox(sqlite_store)) == 1 and all(d.state == "open" for d in sqlite_store.list_dead_letters())
    done = client.post("/v1/dead-letters/replay", json={"filter": {"stage": "source", "source": "orders"}, "limit": 1}).json()
    assert [i["id"] for i in done["items"]] == [dl["record"]] and done["accepted"] == 1


def test_replay_requests_are_validated_and_bounded(sqlite_store: EventStore) -> None:
    dl = seed(sqlite_store)
    client = client_for(sqlite_store)
    for body in ({}, {"ids": [1], "filter": {}}, {"ids": [1], "score": 1}, {"ids": []}, {"ids": list(range(1, 1002))},
                 {"filter": {"stage": "source", "extra": 1}}, {"ids": [1], "rate": 0}, {"filter": {}, "limit": 1001}):
        assert_problem(client.post("/v1/dead-letters/replay", json=body), 422)
    slow = assert_problem(client.post("/v1/dead-letters/replay", json={"filter": {}, "rate": 0.01}), 422)
    assert slow["type"].endswith(":replay-too-slow") and "400 s" in slow["detail"]  # 4 open rows at 0.01/s
    assert all(d.state == "open" for d in sqlite_store.list_dead_letters())
    ok = client.post("/v1/dead-letters/replay", json={"ids": [dl["scoring"]], "rate": 1000}).json()
    assert ok["requeued"] == 1


def test_delete_one_and_delete_by_filter_with_confirmation(sqlite_store: EventStore) -> None:
    dl = seed(sqlite_store)
    client = client_for(sqlite_store)
    resp = client.delete(f"/v1/dead-letters/{dl['failure']}")
    assert resp.status_code == 204 and resp.content == b""
    assert_problem(client.delete(f"/v1/dead-letters/{dl['failure']}"), 404)

    wrong = assert_problem(client.post("/v1/dead-letters/delete", json={"filter": {"stage": "broker"}, "confirm": 5}), 409)
    assert "1 dead letter(s) match, confirm says 5" in wrong["detail"]
    assert len(sqlite_store.list_dead_letters()) == 3  # nothing deleted
    assert_problem(client.post("/v1/dead-letters/delete", json={"filter": {"stage": "broker"}}), 422)  # confirm required
    assert_problem(client.post("/v1/dead-letters/delete", json={"confirm": 1}), 422)
    done = client.post("/v1/dead-letters/delete", json={"filter": {"stage": "broker"}, "confirm": 1}).json()
    assert done == {"deleted": 1, "ids": [dl["broker"]]}

    by_ids = client.post("/v1/dead-letters/delete", json={"ids": [dl["scoring"], dl["record"], 999], "confirm": 2}).json()
    assert by_ids == {"deleted": 2, "ids": [dl["scoring"], dl["record"]]}
    assert sqlite_store.list_dead_letters() == []


def test_openapi_documents_the_dead_letter_endpoints(sqlite_store: EventStore) -> None:
    doc = client_for(sqlite_store).get("/openapi.json").json()
    paths = doc["paths"]
    expected = {
        ("/v1/dead-letters", "get"): {"200", "422", "503"},
        ("/v1/dead-letters/{dead_letter_id}", "get"): {"200", "404", "422", "503"},
        ("/v1/dead-letters/{dead_letter_id}", "delete"): {"204", "404", "422", "503"},
        ("/v1/dead-letters/replay", "post"): {"200", "400", "422", "503"},
        ("/v1/dead-letters/delete", "post"): {"200", "400", "409", "422", "503"},
    }
    for (path, method), codes in expected.items():
        op = paths[path][method]
        assert op["summary"] and op["tags"] == ["dead-letters"]
        assert set(op["responses"]) == codes | {"401", "403", "429"}, (path, method)  # auth and rate limit too
        for code in codes - {"200", "204"}:
            assert "application/problem+json" in op["responses"][code]["content"]
    schemas = doc["components"]["schemas"]
    assert schemas["DeadLetterReplayRequest"]["additionalProperties"] is False
    assert schemas["DeadLetterDeleteRequest"]["required"] == ["confirm"]
