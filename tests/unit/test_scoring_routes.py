"""Model routes by event type (issue 7): topic patterns, config validation, topology, isolation.

Each ``scoring.routes`` entry has its own queue bound to the scoring router by its type patterns;
events of no route reach the default queue through the router's alternate exchange. The patterns
of different routes may not overlap, so every event is scored by exactly one route.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.bus import InMemoryBus, Message, Outcome, Topology
from gateway.config import ScoringSettings, Settings
from gateway.events.topics import check_pattern, topic_matches, topics_overlap
from tests.oip_server import OipServer
from tests.unit.test_scoring_worker import make_events

# ---------------------------------------------------------------------------- patterns
WORDS = st.sampled_from(["a", "b", "*", "#"])
PATTERNS = st.lists(WORDS, min_size=1, max_size=3).map(".".join)
KEYS = [".".join(k) for n in range(0, 6) for k in itertools.product("abc", repeat=n)]


@settings(max_examples=400, deadline=None)
@given(PATTERNS, PATTERNS)
def test_overlap_equals_the_brute_force_search_for_a_common_key(a: str, b: str) -> None:
    # Keys of up to 5 words over {a, b, c} ('c' stands for any other word) decide it for patterns
    # of at most 3 words.
    brute = any(topic_matches(a, k) and topic_matches(b, k) for k in KEYS)
    assert topics_overlap(a, b) == brute == topics_overlap(b, a)


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("payments.#", "orders.#", False),
    ("payments.#", "#.refund", True),  # payments.refund
    ("com.acme.*.created", "com.acme.order.*", True),
    ("com.acme.*.created", "com.acme.order.deleted", False),
    ("a.*", "a.*.*", False),
    ("a.#", "a", True),  # '#' matches zero words
])
def test_overlap_examples(a: str, b: str, overlap: bool) -> None:
    assert topics_overlap(a, b) is overlap


@pytest.mark.parametrize(("pattern", "why"), [
    ("", "1-255 bytes"), ("a..b", "empty word"), (".a", "empty word"), ("a.b*", "whole words"),
    ("a.#x", "whole words"), ("a b", "whitespace"), ("x" * 256, "1-255 bytes"),
])
def test_bad_patterns_say_what_is_wrong(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_pattern(pattern)


# ---------------------------------------------------------------------------- config
def route(name: str, *types: str, model: str = "rules", **kw: object) -> dict[str, object]:
    return {"name": name, "types": list(types), "model": model, **kw}


def test_overlapping_routes_are_refused_naming_both_patterns() -> None:
    with pytest.raises(ValueError) as err:
        ScoringSettings(routes=[route("pay", "payments.#"), route("refunds", "#.refund", model="online-anomaly")])
    text = str(err.value)
    assert "'pay' pattern 'payments.#'" in text and "'refunds' pattern '#.refund'" in text and "one route" in text


@pytest.mark.parametrize(("routes", "expected"), [
    ([route("pay", "p.#"), route("pay", "q.#")], "route names must be unique"),
    ([route("retry", "p.#")], "reserved"),
    ([route("Pay", "p.#")], "String should match pattern"),
    ([route("pay", "p..x")], "empty word"),
    ([route("pay")], "at least 1 item"),
    ([route("pay", "p.#", model="rules", fallback="rules")], "fallback must name another model"),
])
def test_route_config_errors(routes: list[dict[str, object]], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        ScoringSettings(routes=routes)


def test_a_route_inherits_the_fallback_unless_it_sets_one_and_never_the_shadow() -> None:
    sc = ScoringSettings(
        fallback="guard", shadow={"model": "challenger", "fraction": 0.5},
        routes=[route("pay", "p.#", model="fraud"), route("ord", "o.#", model="online-anomaly", fallback=None),
                route("inv", "i.#", model="m3", fallback="other", shadow={"model": "c2", "fraction": 1})],
    )
    pay, ord_, inv, default = sc.for_route("pay"), sc.for_route("ord"), sc.for_route("inv"), sc.for_route(None)
    assert (pay.model, pay.fallback, pay.shadow) == ("fraud", "guard", None)
    assert (ord_.model, ord_.fallback) == ("online-anomaly", None)
    assert (inv.fallback, inv.shadow and inv.shadow.model) == ("other", "c2")
    assert (default.model, default.fallback, default.routes) == ("online-anomaly", "guard", [])
    assert sc.route_names() == [None, "pay", "ord", "inv"]
    with pytest.raises(KeyError, match="no scoring route 'nope'"):
        sc.for_route("nope")


# ---------------------------------------------------------------------------- topology on the in-process bus
def test_every_event_reaches_exactly_one_scoring_queue_and_the_old_binding_is_removed(bus_prefix: str) -> None:
    topo = Topology(bus_prefix, routes=(("pay", ("payments.#",)), ("ord", ("orders.*.created", "orders.*.updated"))))
    bus = InMemoryBus(topo)
    # A store of the previous version: the default queue bound to the events exchange directly.
    bus.declare_exchange(topo.events_exchange, "topic")
    bus.bind(topo.scoring_queue, topo.events_exchange, "#")
    bus.declare_topology()
    types = ["payments.card.charged", "payments", "orders.x.created", "orders.x.updated", "orders.x.deleted", "other"]
    msgs = [Message(f'{{"n": {i}}}'.encode(), t, f"m{i}") for i, t in enumerate(types)]
    assert bus.publisher().publish(topo.events_exchange, msgs).result(5) == [Outcome.ACK] * len(types)
    depth = {name or "default": bus.queue_depth(q) for name, q in topo.scoring_queues()}
    assert depth == {"default": 2, "pay": 2, "ord": 2}
    assert topo.for_route("pay").scoring_queue == f"{bus_prefix}.scoring.pay"
    assert topo.for_route("pay").retry_level(1) == (f"{bus_prefix}.scoring.pay.retry.1000ms", 1000)


# ---------------------------------------------------------------------------- isolation, end to end
def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_one_routes_outage_does_not_stall_the_others_and_each_event_is_scored_once(tmp_path: Path) -> None:
    """relay + scorer on SQLite and the in-process bus. Route ``pay`` scores through a real OIP
    server that answers 500: its breaker opens and its events wait, while the default route goes
    on scoring; when the server recovers, the waiting events are scored, each once, by their route."""
    from gateway.runtime import Gateway

    with OipServer() as srv:
        settings = Settings(
            profile="test", store={"url": f"sqlite:///{tmp_path / 'g.db'}"}, relay={"idle_wait": 0.02},
            scoring={
                "model": "guard", "checkpoint_interval": 0, "score_timeout": 2.0,
                "retry_min_delay": 0.05, "retry_base_delay": 0.05, "retry_max_delay": 0.1,
                "breaker": {"window_size": 2, "minimum_calls": 2, "wait_in_open": 0.3, "half_open_permits": 1},
                "models": {
                    "guard": {"kind": "rules", "options": {"rules": [
                        {"when": "data.amount > 1000000", "score": 0.9, "reason": "huge"}], "default": 0.25}},
                    "fraud": {"kind": "oip", "options": {
                        "url": srv.url, "model": "fraud", "timeout": 1.0,
                        "features": [{"name": "amount", "path": "data.amount", "type": "number"},
                                     {"name": "qty", "path": "data.qty", "type": "number", "default": 1}]}},
                },
                "routes": [{"name": "pay", "types": ["com.acme.payment.#"], "model": "fraud"}],
            },
            bus={"max_attempts": 50, "delivery_limit": 100},
        )
        gw = Gateway(settings, roles=["relay", "scorer"])
        gw.start()  # the OIP scorer reads the model's metadata at start: the server is up then
        transitions: list[str] = []
        gw.breakers.get("scorer:fraud").add_listener(lambda _n, _o, new: transitions.append(new.value))
        srv.fail(500)
        try:
            orders = make_events(30, "com.acme.order.changed")
            payments = make_events(20, "com.acme.payment.received", start=1000)
            gw.store.accept(orders + payments, source_name="orders")
            gw.wake_relay()
            default_worker, pay_worker = gw.scorers[0], gw.scorers[-1]
            assert (default_worker.scorer.name, pay_worker.scorer.name) == ("guard", "fraud")
            guard_version = default_worker.scorer.version
            wait_for(lambda: "open" in transitions, "the pay route's breaker to open")
            # While pay's model is down, the default route keeps scoring, also what arrives now.
            later = make_events(30, "com.acme.order.changed", start=100)
            gw.store.accept(later, source_name="orders")
            gw.wake_relay()
            wait_for(lambda: len(gw.store.get_scores([e.id for e in orders + later], "guard", guard_version)) == 60,
                     "the default route to score every order")
            assert srv.infer_requests() and all(r.body is not None for r in srv.infer_requests())
            assert gw.store.count_scores() == 60  # no payment scored, by any model
            assert gw.store.list_dead_letters() == []
            srv.recover()
            wait_for(lambda: gw.store.count_scores() == 80, "the payments once the server is back")
            fraud = gw.store.get_scores([e.id for e in payments], "fraud", pay_worker.scorer.version)
            assert {k: round(v.score, 6) for k, v in fraud.items()} == {
                e.id: round((float(e.data["amount"]) + 1) / 100, 6) for e in payments  # the server's model
            }
            assert gw.store.get_scores([e.id for e in payments], "guard", guard_version) == {}
            assert gw.store.list_dead_letters() == []
        finally:
            gw.stop()


def test_worker_route_option_names_the_configured_routes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gateway.cli import app

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "profile: dev\nbus: {url: 'amqp://guest:guest@127.0.0.1:1/%2F'}\n"
        "scoring:\n  routes:\n    - {name: pay, types: ['payments.#'], model: online-anomaly}\n"
    )
    runner = CliRunner()
    bad = runner.invoke(app, ["worker", "--role", "scorer", "--route", "nope", "-c", str(cfg)])
    assert bad.exit_code == 2 and "unknown scoring route(s) ['nope']; configured: ['default', 'pay']" in bad.output
    wrong_role = runner.invoke(app, ["worker", "--role", "relay", "--route", "pay", "-c", str(cfg)])
    assert wrong_role.exit_code == 2 and "--route applies to --role scorer only" in wrong_role.output


def test_the_models_in_use_over_rest_hide_secrets(sqlite_store: object) -> None:
    from fastapi.testclient import TestClient

    from gateway.api import create_app
    from gateway.events import utcnow
    from gateway.store import ScoreRecord

    settings = Settings(profile="test", api={"auth": False}, scoring={
        "model": "online-anomaly",
        "models": {"fraud": {"kind": "oip", "options": {"url": "https://m.example/v2", "model": "fraud",
                                                        "headers": {"Authorization": "Bearer s3cr3t"}}}},
        "routes": [{"name": "pay", "types": ["payments.#"], "model": "fraud", "shadow": {"model": "rules-x"}}],
    })
    ev = make_events(1)[0]
    sqlite_store.accept([ev], source_name="orders")  # type: ignore[attr-defined]
    sqlite_store.save_scores([ScoreRecord(ev.id, "fraud", "3", 0.5, None, ev.type, "orders", ev.time, utcnow())])  # type: ignore[attr-defined]
    body = TestClient(create_app(settings, sqlite_store)).get("/v1/scoring/models")  # type: ignore[arg-type]
    assert body.status_code == 200
    got = body.json()
    assert [r["route"] for r in got["routes"]] == ["default", "pay"]
    assert got["routes"][1] == {"route": "pay", "types": ["payments.#"], "model": "fraud", "fallback": None,
                                "shadow": {"model": "rules-x", "fraction": 0.1}}
    assert got["models"]["fraud"]["kind"] == "oip" and "s3cr3t" not in body.text and "m.example" not in body.text
    assert got["versions"][0]["model"] == "fraud" and got["versions"][0]["scores"] == 1
    assert got["versions"][0]["last_scored_at"]
