"""gateway.consumer: parsing, topology, dispatch, attempt counting, idempotency and stop, on the in-process bus."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import pytest

from gateway.bus import InMemoryBus, Message, Outcome, Topology
from gateway.bus.protocols import Delivery
from gateway.consumer import DEFAULT_DELIVERY_LIMIT, ScoredEvent, ScoredEventConsumer
from gateway.errors import (
    ConfigurationError,
    ContractError,
    PermanentError,
    SkippableError,
)
from gateway.events import Event
from gateway.events.scored import scored_event

PREFIX = "unit"
QUEUE = "fraud-desk.scored"


def original(n: int, type_: str = "com.acme.cards.transaction.changed") -> Event:
    return Event(
        id=f"00000000-0000-5000-8000-{n:012d}", source="/legacy-gateway/sources/cards", type=type_,
        time=datetime(2024, 1, 1, 12, 0, n % 60, tzinfo=timezone.utc), subject=f"transaction/{n}",
        data={"txn_id": n, "amount": "18.22"},
        extensions={"sourcename": "cards", "sourceadapter": "sql", "sourceposition": f'{{"key":{n}}}'},
    )


def scored_message(n: int, type_: str = "com.acme.cards.transaction.changed", score: float = 0.5) -> Message:
    se = scored_event(original(n, type_), score=score, model_name="online-anomaly", model_version="1",
                      explanation={"amount": 1.5})
    return Message(body=se.to_json(), routing_key=type_, message_id=se.id)


def publish(bus: InMemoryBus, *messages: Message) -> None:
    out = bus.publisher().publish(f"{PREFIX}.scored", list(messages)).result(1)
    assert out == [Outcome.ACK] * len(messages)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def bus() -> Iterator[InMemoryBus]:
    b = InMemoryBus(Topology(PREFIX))
    yield b
    b.close()


def make_app(bus: InMemoryBus, **kw: Any) -> ScoredEventConsumer:
    kw.setdefault("prefetch", 10)
    kw.setdefault("stop_timeout", 5.0)
    return ScoredEventConsumer(queue=QUEUE, prefix=PREFIX, bus=bus, **kw)


# ---------------------------------------------------------------- parsing
def test_scored_event_parses_every_field() -> None:
    orig = original(7)
    se = scored_event(orig, score=0.93, model_name="m", model_version="2", explanation={"amount": 3.0})
    ev = ScoredEvent.from_json(se.to_json())
    assert (ev.id, ev.type, ev.source, ev.subject) == (se.id, orig.type + ".scored", "/legacy-gateway/scorer", "transaction/7")
    assert ev.time == se.time
    assert (ev.score, ev.model_name, ev.model_version, ev.explanation) == (0.93, "m", "2", {"amount": 3.0})
    assert (ev.original_id, ev.original_type, ev.original_source) == (orig.id, orig.type, orig.source)
    assert ev.data == {"txn_id": 7, "amount": "18.22"}
    assert ev.original["id"] == orig.id and ev.extensions["sourcename"] == "cards"
    assert ev.raw["data"]["score"] == 0.93


def _scored_dict() -> dict[str, Any]:
    return scored_event(original(1), score=0.5, model_name="m", model_version="1").to_dict()


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        (lambda d: d["data"].update(score=1.5), r"data\.score"),
        (lambda d: d["data"].update(score="0.5"), r"data\.score"),
        (lambda d: d["data"].update(score=True), r"data\.score"),
        (lambda d: d["data"].pop("model"), r"data\.model"),
        (lambda d: d["data"]["event"].pop("id"), r"data\.event\.id"),
        (lambda d: d.update(data="text"), r"scored event\.data"),
        (lambda d: d.update(type="com.acme.x"), r"scored event\.type"),
        (lambda d: d.pop("specversion"), r"specversion"),
    ],
)
def test_invalid_scored_events_name_the_problem(patch: Callable[[dict[str, Any]], Any], match: str) -> None:
    obj = _scored_dict()
    patch(obj)
    with pytest.raises(ContractError, match=match):
        ScoredEvent.from_dict(obj)


def test_not_json_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="not valid JSON"):
        ScoredEvent.from_json(b"\xff{nope")


# ---------------------------------------------------------------- topology and configuration
def test_topology_declares_dlx_first_exact_quorum_arguments_and_one_binding_per_pattern(bus: InMemoryBus) -> None:
    app = make_app(bus, max_attempts=4)
    app.on("com.acme.#")(lambda e: None)
    app.on("*.order.*")(lambda e: None)
    app.on("com.acme.#", min_score=0.9)(lambda e: None)
    t = app.topology()
    assert t.exchanges() == [(f"{QUEUE}.dlx", "fanout"), (f"{PREFIX}.scored", "topic")]
    dead, main = t.queues()
    assert dead.name == f"{QUEUE}.dead" and dead.bindings == ((f"{QUEUE}.dlx", ""),)
    assert main.name == QUEUE
    assert main.arguments == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": f"{QUEUE}.dlx", "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish", "x-delivery-limit": DEFAULT_DELIVERY_LIMIT,
    }
    assert main.bindings == ((f"{PREFIX}.scored", "com.acme.#"), (f"{PREFIX}.scored", "*.order.*"))


def test_declaring_next_to_the_gateway_does_not_conflict(bus: InMemoryBus) -> None:
    bus.declare_topology()  # the gateway's own declaration of <prefix>.scored and the rest
    app = make_app(bus)
    app.on("#")(lambda e: None)
    with app:
        publish(bus, scored_message(1))
        wait_until(lambda: app.stats.acked == 1)
    bus.declare_topology()  # and the other way round


@pytest.mark.parametrize("queue", [f"{PREFIX}.scoring", f"{PREFIX}.dead", f"{PREFIX}.scored", f"{PREFIX}.dlx",
                                   f"{PREFIX}.scoring.retry.1000ms", f"{PREFIX}.bridge.x", PREFIX])
def test_the_gateways_names_are_refused(bus: InMemoryBus, queue: str) -> None:
    with pytest.raises(ConfigurationError, match="gateway's names"):
        ScoredEventConsumer(queue=queue, prefix=PREFIX, bus=bus)


@pytest.mark.parametrize(
    "kw",
    [{"workers": 3, "prefetch": 2}, {"max_attempts": 5, "delivery_limit": 5}, {"max_attempts": 0}, {"prefetch": 0}],
)
def test_bad_numbers_are_refused(bus: InMemoryBus, kw: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError):
        ScoredEventConsumer(queue=QUEUE, prefix=PREFIX, bus=bus, **kw)


def test_exactly_one_of_url_and_bus(bus: InMemoryBus) -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        ScoredEventConsumer(queue=QUEUE)
    with pytest.raises(ConfigurationError, match="exactly one"):
        ScoredEventConsumer("amqp://localhost", queue=QUEUE, bus=bus)
    with pytest.raises(ConfigurationError, match="amqp://"):
        ScoredEventConsumer("http://localhost", queue=QUEUE)


def test_handler_signatures(bus: InMemoryBus) -> None:
    app = make_app(bus)
    with pytest.raises(TypeError, match=r"\(event\) or \(event, delivery\)"):
        app.on("#")(lambda a, b, c: None)
    with pytest.raises(TypeError):
        app.on("#")(lambda: None)
    with pytest.raises(ConfigurationError, match="pattern"):
        app.on("a..b")
    with pytest.raises(ConfigurationError, match="min_score"):
        app.on("#", min_score=2.0)
    with pytest.raises(ConfigurationError, match="at least one handler"):
        app.start()


def test_registering_after_start_is_refused(bus: InMemoryBus) -> None:
    app = make_app(bus)
    app.on("#")(lambda e: None)
    with app, pytest.raises(RuntimeError, match="before start"):
        app.on("a.#")(lambda e: None)


class RecordingConsumer:
    """A Consumer double recording acks and rejects (for the attempt count without broker headers)."""

    def __init__(self) -> None:
        self.acks: list[Any] = []
        self.rejects: list[tuple[Any, bool]] = []

    def get_batch(self, max_messages: int, max_wait: float, linger: float) -> list[Delivery]:
        return []

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        self.acks.extend(d.tag for d in deliveries)

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        self.rejects.append((delivery.tag, requeue))

    def pause(self) -> None: ...

    def resume(self, prefetch: int | None = None) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- dispatch
def test_handlers_get_exactly_the_types_their_patterns_match(bus: InMemoryBus) -> None:
    cards: list[str] = []
    orders: list[tuple[str, str]] = []
    app = make_app(bus, workers=2)

    @app.on("com.acme.cards.#")
    def on_cards(event: ScoredEvent) -> None:
        cards.append(event.original_type)

    @app.on("*.order.*")
    def on_orders(event: ScoredEvent, delivery: Delivery) -> None:
        orders.append((event.original_type, delivery.routing_key))

    msgs = [scored_message(1, "com.acme.cards.transaction.changed"), scored_message(2, "acme.order.created"),
            scored_message(3, "com.acme.order.created"), scored_message(4, "com.acme.cards.limit")]
    with app:
        out = bus.publisher().publish(f"{PREFIX}.scored", msgs).result(1)
        assert out == [Outcome.ACK, Outcome.ACK, Outcome.RETURNED, Outcome.ACK]  # nothing bound for msg 3
        wait_until(lambda: app.stats.acked == 3)
    assert sorted(cards) == ["com.acme.cards.limit", "com.acme.cards.transaction.changed"]
    assert orders == [("acme.order.created", "acme.order.created")]
    assert bus.queue_depth(QUEUE) == 0 and bus.queue_depth(f"{QUEUE}.dead") == 0


def _delivery(msg: Message, tag: int, count: int | None = None) -> Delivery:
    headers = {} if count is None else {"x-delivery-count": count}
    return Delivery(msg.body, msg.routing_key, msg.message_id, headers, bool(count), tag)


def test_every_matching_handler_runs_once_and_the_ack_waits_for_all(bus: InMemoryBus) -> None:
    # Overlapping patterns are dispatched in process(); RabbitMQ delivers the message once per
    # queue however many of its bindings match (the integration test checks that part).
    a: list[str] = []
    b: list[str] = []
    app = make_app(bus)

    @app.on("#")
    def first(event: ScoredEvent) -> None:
        a.append(event.id)

    @app.on("com.acme.cards.#")
    def second(event: ScoredEvent) -> None:
        b.append(event.id)
        if len(b) == 1:
            raise RuntimeError("once")

    con = RecordingConsumer()
    msg = scored_message(1)
    app.process(con, _delivery(msg, 1))
    assert con.rejects == [(1, True)] and con.acks == []
    app.process(con, _delivery(msg, 2, count=1))
    assert con.acks == [2] and con.rejects == [(1, True)]
    assert len(a) == 2 and len(b) == 2  # the redelivery runs every matching handler again
    app.process(con, _delivery(scored_message(3, "acme.order.created"), 3))
    assert con.acks == [2, 3] and len(a) == 3 and len(b) == 2


def test_min_score_filters_per_handler(bus: InMemoryBus) -> None:
    high: list[float] = []
    low: list[float] = []
    app = make_app(bus)
    app.on("#", min_score=0.9)(lambda e: high.append(e.score))
    app.on("#")(lambda e: low.append(e.score))
    with app:
        publish(bus, scored_message(1, score=0.95), scored_message(2, score=0.2), scored_message(3, score=0.9))
        wait_until(lambda: app.stats.acked == 3)
    assert sorted(high) == [0.9, 0.95]
    assert sorted(low) == [0.2, 0.9, 0.95]


def test_unmatched_messages_from_a_stale_binding_are_acked(bus: InMemoryBus) -> None:
    got: list[str] = []
    app = make_app(bus)
    app.on("com.acme.#")(lambda e: got.append(e.id))
    with app:
        bus.bind(QUEUE, f"{PREFIX}.scored", "legacy.#")  # left from an earlier version of the app
        publish(bus, scored_message(1, "legacy.thing"))
        wait_until(lambda: app.stats.acked == 1)
    assert got == [] and app.stats.unmatched == 1 and bus.queue_depth(QUEUE) == 0


# ---------------------------------------------------------------- failures and attempts
def test_failing_twice_then_succeeding_is_delivered_three_times_and_acked(bus: InMemoryBus) -> None:
    calls: list[int] = []

    app = make_app(bus, max_attempts=3)

    @app.on("#")
    def flaky(event: ScoredEvent, delivery: Delivery) -> None:
        calls.append(delivery.delivery_count)
        if len(calls) < 3:
            raise RuntimeError("downstream hiccup")

    with app:
        publish(bus, scored_message(1))
        wait_until(lambda: app.stats.acked == 1)
    assert calls == [0, 1, 2]
    assert (app.stats.retried, app.stats.dead_lettered) == (2, 0)
    assert bus.queue_depth(QUEUE) == 0 and bus.queue_depth(f"{QUEUE}.dead") == 0


def test_always_failing_goes_to_the_dead_queue_after_max_attempts(bus: InMemoryBus) -> None:
    calls: list[str] = []
    app = make_app(bus, max_attempts=3)

    @app.on("#")
    def broken(event: ScoredEvent) -> None:
        calls.append(event.id)
        raise RuntimeError("bug")

    with app:
        publish(bus, scored_message(1))
        wait_until(lambda: bus.queue_depth(f"{QUEUE}.dead") == 1)
    assert len(calls) == 3
    assert (app.stats.retried, app.stats.dead_lettered, app.stats.acked) == (2, 1, 0)


def test_permanent_error_dead_letters_at_once_and_skippable_acks(bus: InMemoryBus) -> None:
    calls: list[str] = []
    app = make_app(bus)

    @app.on("com.acme.#")
    def h(event: ScoredEvent) -> None:
        calls.append(event.subject or "")
        if event.subject == "transaction/1":
            raise PermanentError("cannot ever work")
        raise SkippableError("not for us")

    with app:
        publish(bus, scored_message(1), scored_message(2))
        wait_until(lambda: app.stats.acked == 1 and app.stats.dead_lettered == 1)
    assert sorted(calls) == ["transaction/1", "transaction/2"]
    assert bus.queue_depth(f"{QUEUE}.dead") == 1 and app.stats.retried == 0


def test_poison_body_goes_to_the_dead_queue_and_the_loop_goes_on(bus: InMemoryBus) -> None:
    got: list[str] = []
    app = make_app(bus)
    app.on("#")(lambda e: got.append(e.id))
    good = scored_message(2)
    with app:
        publish(bus, Message(body=b"not a cloudevent", routing_key="com.acme.x", message_id="poison-1"), good)
        wait_until(lambda: app.stats.acked == 1 and app.stats.dead_lettered == 1)
    assert got == [good.message_id]
    assert app.stats.parse_errors == 1 and bus.queue_depth(f"{QUEUE}.dead") == 1


def test_attempts_are_counted_in_memory_by_message_id_when_the_broker_sends_no_count(bus: InMemoryBus) -> None:
    app = make_app(bus, max_attempts=3)
    calls: list[str] = []

    @app.on("#")
    def broken(event: ScoredEvent) -> None:
        calls.append(event.id)
        raise RuntimeError("bug")

    con = RecordingConsumer()
    msg = scored_message(1)
    other = scored_message(2)
    for tag in range(1, 4):  # a classic queue: redelivered, but no x-delivery-count header
        app.process(con, Delivery(msg.body, msg.routing_key, msg.message_id, {}, tag > 1, tag))
    app.process(con, Delivery(other.body, other.routing_key, other.message_id, {}, False, 99))
    assert con.rejects == [(1, True), (2, True), (3, False), (99, True)]
    assert len(calls) == 4
    # The broker's count wins when it is higher (e.g. another consumer failed it before).
    app.process(con, Delivery(other.body, other.routing_key, other.message_id, {"x-delivery-count": 5}, True, 100))
    assert con.rejects[-1] == (100, False)


# ---------------------------------------------------------------- idempotency
def test_idempotent_handlers_skip_event_ids_they_handled(bus: InMemoryBus) -> None:
    once: list[str] = []
    every: list[str] = []
    app = make_app(bus, seen_size=2)
    app.on("#", idempotent=True)(lambda e: once.append(e.id))
    app.on("#")(lambda e: every.append(e.id))
    m1, m2, m3 = scored_message(1), scored_message(2), scored_message(3)
    with app:
        publish(bus, m1, m1)  # a republish after a gateway crash: same id, same content
        wait_until(lambda: app.stats.acked == 2)
        assert once == [m1.message_id] and every == [m1.message_id] * 2
        assert app.stats.duplicates_skipped == 1
        publish(bus, m2, m3, m1)  # the seen-set is bounded: m1 was evicted by m2 and m3
        wait_until(lambda: app.stats.acked == 5)
    assert once == [m1.message_id, m2.message_id, m3.message_id, m1.message_id]


def test_idempotent_handler_that_succeeded_is_not_rerun_on_a_retry(bus: InMemoryBus) -> None:
    side_effects: list[str] = []
    tries: list[str] = []
    app = make_app(bus)
    app.on("#", idempotent=True)(lambda e: side_effects.append(e.id))

    @app.on("#")
    def flaky(event: ScoredEvent) -> None:
        tries.append(event.id)
        if len(tries) == 1:
            raise RuntimeError("once")

    with app:
        publish(bus, scored_message(1))
        wait_until(lambda: app.stats.acked == 1)
    assert len(side_effects) == 1 and len(tries) == 2


# ---------------------------------------------------------------- stop
def test_stop_finishes_the_in_flight_handler_acks_it_and_leaves_the_rest_queued(bus: InMemoryBus) -> None:
    entered = threading.Event()
    release = threading.Event()
    done: list[str] = []
    app = make_app(bus, workers=1)

    @app.on("#")
    def slow(event: ScoredEvent) -> None:
        entered.set()
        release.wait(5)
        done.append(event.id)

    app.start()
    publish(bus, scored_message(1), scored_message(2), scored_message(3))
    assert entered.wait(5)
    stopper = threading.Thread(target=app.stop)
    stopper.start()
    time.sleep(0.2)
    assert stopper.is_alive()  # waits for the handler
    release.set()
    stopper.join(5)
    assert not stopper.is_alive()
    assert len(done) == 1 and app.stats.acked == 1
    assert bus.queue_depth(QUEUE) == 2  # the in-flight one acked, the others still queued


def test_run_in_a_thread_returns_after_stop_from_a_handler(bus: InMemoryBus) -> None:
    app = make_app(bus)
    got: list[str] = []

    @app.on("#")
    def last(event: ScoredEvent) -> None:
        got.append(event.id)
        app.stop()  # from the worker thread: returns at once, run() finishes the shutdown

    runner = threading.Thread(target=app.run)
    runner.start()
    publish(bus, scored_message(1))
    runner.join(5)
    assert not runner.is_alive()
    assert len(got) == 1 and app.stats.acked == 1 and bus.queue_depth(QUEUE) == 0
    app.stop()  # idempotent


def test_stop_racing_start_leaves_nothing_running(bus: InMemoryBus) -> None:
    for _ in range(20):
        app = make_app(bus, workers=2)
        app.on("#")(lambda e: None)
        runner = threading.Thread(target=app.run)
        runner.start()
        app.stop()  # maybe before run() got to start(), maybe during, maybe after
        runner.join(5)
        assert not runner.is_alive()
        assert not any(t.is_alive() for t in app._threads)
        if app.consumer is not None:  # it had started: its consumer is closed, nobody takes messages
            before = bus.queue_depth(QUEUE)
            publish(bus, scored_message(1))
            time.sleep(0.05)
            assert bus.queue_depth(QUEUE) == before + 1


def test_stop_before_start_returns_and_the_consumer_cannot_start_again(bus: InMemoryBus) -> None:
    app = make_app(bus)
    app.on("#")(lambda e: None)
    t0 = time.monotonic()
    app.stop()
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(RuntimeError, match="stopped"):
        app.start()
