"""REL-12: retry discipline -- what is retried, how often, within which deadline and budget.

Sleeps are patched (a fake sleep moves a fake clock), so nothing here waits. Native errors go
through the real classifier of their integration before the retry policy sees them, as in the
adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import ResilienceSettings, SourceSettings
from gateway.errors import (
    CircuitOpenError,
    ConfigurationError,
    ContractError,
    GatewayError,
    PermanentError,
    SkippableError,
    TransientError,
)
from gateway.metrics import ResilienceMetrics
from gateway.resilience import (
    BreakerPolicy,
    BreakerRegistry,
    BudgetPolicy,
    CircuitBreaker,
    RetryBudget,
    RetryPolicy,
    guarded,
    retrying,
)
from gateway.sources.runner import SourceRunner
from gateway.store import EventStore
from tests.fakes import FakeClock
from tests.unit.test_error_taxonomy import NATIVE
from tests.unit.test_source_breaker import MemorySource, rows

ATTEMPTS = 4
POLICY = RetryPolicy(attempts=ATTEMPTS, base_delay=0.01, max_delay=0.05, deadline=60.0)


class Sleeper:
    """A fake sleep that records the waits and moves the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)


def attempts_until_given_up(error: BaseException, policy: RetryPolicy = POLICY, **kw: Any) -> int:
    """Call a function that always raises ``error`` under ``retrying``; return how often it ran."""
    clock = FakeClock()
    calls = 0

    def fail() -> None:
        nonlocal calls
        calls += 1
        raise error

    with pytest.raises(type(error)):
        retrying(policy, sleep=Sleeper(clock), clock=clock, **kw)(fail)
    return calls


# ---------------------------------------------------------------------------- what is retried

@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TransientError("blip"), ATTEMPTS),
        (PermanentError("no such order"), 1),
        (ContractError("bad record"), 1),
        (ConfigurationError("bad url"), 1),
        (SkippableError("heartbeat record"), 1),
        (CircuitOpenError("source:orders", 30.0), 1),  # transient for callers further out, never here
        (ValueError("a bug"), 1),  # unclassified: not on the allowlist
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_attempts_per_taxonomy_class(error: BaseException, expected: int) -> None:
    assert attempts_until_given_up(error) == expected


@pytest.mark.parametrize(("case", "make", "classify", "expected"), NATIVE, ids=[c[0] for c in NATIVE])
def test_attempts_per_native_error_through_its_classifier(
    case: str, make: Callable[[], BaseException], classify: Callable[[BaseException], GatewayError],
    expected: type[GatewayError],
) -> None:
    """SOAP business faults, HTTP 4xx, integrity and programming errors: one attempt; timeouts,
    5xx, pika connection errors and DBAPI OperationalError: every attempt of the policy."""
    classified = classify(make())
    retried = isinstance(classified, TransientError) and not isinstance(classified, CircuitOpenError)
    assert attempts_until_given_up(classified) == (ATTEMPTS if retried else 1), case
    assert retried == issubclass(expected, TransientError)


def test_a_call_that_recovers_returns_its_result_after_the_retries() -> None:
    outcomes: list[Exception | str] = [TransientError("1"), TransientError("2"), "ok"]

    def flaky() -> str:
        item = outcomes.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    clock = FakeClock()
    sleeper = Sleeper(clock)
    assert retrying(POLICY, sleep=sleeper, clock=clock)(flaky) == "ok"
    assert len(sleeper.waits) == 2 and all(0 <= w <= POLICY.max_delay for w in sleeper.waits)


# ---------------------------------------------------------------------------- logs, backoff, deadline

def test_exactly_one_warning_per_retry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    failures = 3
    left = [failures]

    def flaky() -> str:
        if left[0]:
            left[0] -= 1
            raise TransientError("database unavailable")
        return "ok"

    clock = FakeClock()
    budget = RetryBudget("db", clock=clock)
    assert retrying(POLICY, budget=budget, sleep=Sleeper(clock), clock=clock)(flaky) == "ok"
    retry_logs = [r for r in caplog.records if r.name == "gateway.retry"]
    assert len(retry_logs) == failures
    assert all(r.levelno == logging.WARNING and "TransientError" in r.getMessage() for r in retry_logs)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "gateway.retry"]


def test_waits_are_full_jitter_exponential_and_capped() -> None:
    clock = FakeClock()
    sleeper = Sleeper(clock)
    policy = RetryPolicy(attempts=30, base_delay=0.5, max_delay=4.0, deadline=1e9)
    with pytest.raises(TransientError):
        retrying(policy, sleep=sleeper, clock=clock)(_always(TransientError("down")))
    assert len(sleeper.waits) == 29
    for n, wait in enumerate(sleeper.waits):
        assert 0 <= wait <= min(4.0, 0.5 * 2**n)
    assert len(set(sleeper.waits)) > 1  # jittered, not a fixed schedule


def test_deadline_bounds_the_whole_call_on_a_fake_clock() -> None:
    """Every attempt takes 0.4 s and waits up to 1 s: with a 5 s deadline the call gives up
    before the attempt limit, and no wait is started that would end past the deadline."""
    clock = FakeClock()
    sleeper = Sleeper(clock)
    started = clock()
    calls = 0

    def slow_failure() -> None:
        nonlocal calls
        calls += 1
        clock.advance(0.4)
        raise TransientError("timeout")

    policy = RetryPolicy(attempts=100, base_delay=1.0, max_delay=1.0, deadline=5.0)
    with pytest.raises(TransientError):
        retrying(policy, sleep=sleeper, clock=clock)(slow_failure)
    assert 2 <= calls < 100
    assert clock() - started - 0.4 <= 5.0  # the last attempt began within the deadline
    waits_end = [started + sum(sleeper.waits[: i + 1]) + 0.4 * (i + 1) for i in range(len(sleeper.waits))]
    assert all(end <= started + 5.0 for end in waits_end)


# ---------------------------------------------------------------------------- the budget

def _always(error: Exception) -> Callable[[], None]:
    def fail() -> None:
        raise error

    return fail


def test_100_failing_calls_retry_at_most_10_beyond_the_initial_bucket(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()  # never moved: no time refill
    metrics = ResilienceMetrics(CollectorRegistry())
    registry = BreakerRegistry(clock, metrics=metrics)
    budget = registry.budget("soap:erp", BudgetPolicy(ratio=0.1, reserve=10, min_retries_per_second=0.1))
    caplog.set_level(logging.INFO)
    calls = 0

    def fail() -> None:
        nonlocal calls
        calls += 1
        raise TransientError("erp down")

    run = retrying(POLICY, budget=budget, sleep=lambda _s: None, clock=clock)  # reused, as the runner does
    for _ in range(100):
        with pytest.raises(TransientError):
            run(fail)
    retries = calls - 100
    assert retries <= 10 + 10  # 10 tokens in the initial bucket + 100 * 0.1 deposited
    assert retries >= 10  # the reserve is usable: a quiet downstream can retry a blip
    assert retries == budget.snapshot()["retries"]
    sample = metrics.registry.get_sample_value
    assert sample("gateway_retries_total", {"downstream": "soap:erp"}) == retries
    refused = sample("gateway_retry_budget_exhausted_total", {"downstream": "soap:erp"})
    assert refused is not None and refused == budget.snapshot()["refused"] > 0
    exhausted_logs = [r for r in caplog.records if r.name == "gateway.retry.budget" and r.levelno == logging.WARNING]
    assert len(exhausted_logs) == 1  # once per exhaustion episode, not once per refusal
    # Every refused retry made the call end at its first failure: one attempt only.
    assert calls == 100 + retries


def test_an_exhausted_budget_fails_the_call_at_once_without_waiting() -> None:
    clock = FakeClock()
    budget = RetryBudget("x", BudgetPolicy(ratio=0.0, reserve=0, min_retries_per_second=0), clock=clock)
    sleeper = Sleeper(clock)
    assert attempts_until_given_up(TransientError("down"), budget=budget) == 1
    with pytest.raises(TransientError):
        retrying(POLICY, budget=budget, sleep=sleeper, clock=clock)(_always(TransientError("down")))
    assert sleeper.waits == []


def test_budget_refills_over_time_for_a_quiet_downstream_and_logs_each_episode_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    budget = RetryBudget("quiet", BudgetPolicy(ratio=0.1, reserve=2, min_retries_per_second=0.1), clock=clock)
    assert [budget.try_withdraw() for _ in range(3)] == [True, True, False]
    assert budget.try_withdraw() is False
    clock.advance(10.0)  # 0.1 token/s: one retry's worth
    assert budget.try_withdraw() is True
    assert budget.try_withdraw() is False  # still the same episode: the bucket never got full
    clock.advance(1000.0)
    assert budget.balance == 2.0  # the refill stops at the reserve
    assert [budget.try_withdraw() for _ in range(3)] == [True, True, False]  # a second episode
    warnings = [r for r in caplog.records if r.name == "gateway.retry.budget" and r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert budget.snapshot()["exhausted"] is True


def test_deposits_never_bank_more_than_the_reserve() -> None:
    budget = RetryBudget("busy", BudgetPolicy(ratio=0.5, reserve=3, min_retries_per_second=0), clock=FakeClock())
    for _ in range(1000):
        budget.deposit()
    assert budget.balance == 3.0
    assert sum(budget.try_withdraw() for _ in range(10)) == 3


def test_guarded_spends_the_budget_and_never_retries_an_open_breaker() -> None:
    clock = FakeClock()
    registry = BreakerRegistry(clock)
    breaker = registry.get("db", BreakerPolicy(window_size=2, minimum_calls=2, failure_rate_threshold=50))
    budget = registry.budget("db", BudgetPolicy(ratio=0.0, reserve=5, min_retries_per_second=0))
    assert registry.budget("db") is budget  # one budget per downstream, like the breaker
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise TransientError("down")

    # Two failures open the breaker; the third attempt is refused by it and not retried.
    with pytest.raises(CircuitOpenError):
        guarded(POLICY, breaker, down, sleep=lambda _s: None, budget=budget)
    assert calls == 2 and budget.snapshot()["retries"] == 2


# ---------------------------------------------------------------------------- configuration

def test_policies_come_from_the_resilience_settings_with_per_downstream_overrides() -> None:
    res = ResilienceSettings.model_validate(
        {
            "retry": {"attempts": 4, "base_delay": 0.1},
            "budget": {"ratio": 0.2},
            "downstreams": {"soap:https://erp/orders": {"retry": {"attempts": 2}, "budget": {"reserve": 3}}},
        }
    )
    assert res.retry_policy("source:other") == RetryPolicy(attempts=4, base_delay=0.1, max_delay=5.0, deadline=30.0)
    assert res.retry_policy("soap:https://erp/orders").attempts == 2
    assert res.retry_policy("soap:https://erp/orders").base_delay == 0.1
    assert res.budget_policy("soap:https://erp/orders") == BudgetPolicy(ratio=0.2, reserve=3, min_retries_per_second=0.1)
    assert res.retry_policy("startup", default=RetryPolicy(12, 0.5, 10.0, 60.0)).attempts == 12
    with pytest.raises(ValueError, match="attemps"):
        ResilienceSettings.model_validate({"downstreams": {"x": {"retry": {"attemps": 3}}}})
    with pytest.raises(ValueError):
        ResilienceSettings.model_validate({"budget": {"ratio": 1.5}})


def test_the_runner_retries_its_fetch_with_the_policy_and_budget_of_its_downstream(sqlite_store: EventStore) -> None:
    settings = SourceSettings.model_validate(
        {"name": "mem", "adapter": "memory", "mapping": {"type": "t", "entity": "e", "key": ["id"]}}
    )
    res = ResilienceSettings.model_validate(
        {"downstreams": {"source:mem": {"retry": {"attempts": 3, "base_delay": 0}, "budget": {"reserve": 1, "ratio": 0}}}}
    )
    adapter = MemorySource(rows(3))
    adapter.down = True
    clock = FakeClock()
    registry = BreakerRegistry(clock)
    runner = SourceRunner(settings, sqlite_store, adapter=adapter, sleep=lambda _s: None, clock=clock,
                          breakers=registry, resilience=res)
    with pytest.raises(TransientError):
        runner.run_once()
    assert adapter.calls == 2  # 3 attempts allowed, but the budget held one retry only
    assert registry.budget("source:mem").snapshot()["refused"] == 1
    with pytest.raises(TransientError):
        runner.run_once()
    assert adapter.calls == 3  # the budget is empty: the error propagates at once
    adapter.down = False
    assert len(runner.run_once().records) == 3


# ---------------------------------------------------------------------------- breaker metrics

def test_breaker_metrics_follow_states_transitions_and_calls() -> None:
    clock = FakeClock()
    metrics = ResilienceMetrics(CollectorRegistry())
    registry = BreakerRegistry(clock, metrics=metrics)
    policy = BreakerPolicy(window_size=2, minimum_calls=2, failure_rate_threshold=50, wait_in_open=10,
                           half_open_permits=1, slow_call_duration=1.0)
    breaker: CircuitBreaker = registry.get("soap:erp", policy)
    sample = metrics.registry.get_sample_value

    def state() -> float | None:
        return sample("gateway_breaker_state", {"breaker": "soap:erp"})

    def calls(outcome: str) -> float:
        return sample("gateway_breaker_calls_total", {"breaker": "soap:erp", "outcome": outcome}) or 0.0

    assert state() == 0
    with breaker.calling():
        clock.advance(2.0)  # a slow success
    with pytest.raises(TransientError), breaker.calling():
        raise TransientError("down")
    assert state() == 2  # 1 of 2 failed: 50 % opens it
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: None)
    clock.advance(10.0)
    assert breaker.state.value == "half_open" and state() == 1
    breaker.call(lambda: None)
    assert state() == 0
    assert (calls("success"), calls("failure"), calls("rejected"), calls("slow")) == (2, 1, 1, 1)
    transitions = {
        (f, t): sample("gateway_breaker_transitions_total", {"breaker": "soap:erp", "from": f, "to": t})
        for f, t in (("closed", "open"), ("open", "half_open"), ("half_open", "closed"))
    }
    assert transitions == {("closed", "open"): 1, ("open", "half_open"): 1, ("half_open", "closed"): 1}


def test_readyz_lists_every_breaker_of_the_process_without_affecting_readiness(sqlite_store: EventStore) -> None:
    from fastapi.testclient import TestClient

    from gateway.api import create_app
    from gateway.config import Settings

    clock = FakeClock()
    prom = CollectorRegistry()
    registry = BreakerRegistry(clock, metrics=ResilienceMetrics(prom))
    registry.get("source:orders").force_open(wait=30.0)
    registry.get("store")
    app = create_app(Settings(), sqlite_store, registry=prom)
    app.state.breakers = registry
    client = TestClient(app)
    ready = client.get("/readyz")
    assert ready.status_code == 200  # an open breaker is detail, not unreadiness
    breakers = ready.json()["breakers"]
    assert set(breakers) == {"source:orders", "store"}
    assert breakers["source:orders"]["state"] == "open" and breakers["source:orders"]["retry_after"] == 30.0
    assert breakers["store"] == {"name": "store", "state": "closed", "failure_rate": 0.0, "retry_after": 0.0}
    text = client.get("/metrics").text
    assert 'gateway_breaker_state{breaker="source:orders"} 2.0' in text
    assert 'gateway_breaker_transitions_total{breaker="source:orders",from="closed",to="open"} 1.0' in text


def test_a_worker_serves_the_resilience_metrics_on_its_own_port(tmp_path: Any) -> None:
    import urllib.request

    from gateway.config import Settings
    from gateway.runtime import Gateway

    settings = Settings.model_validate(
        {"store": {"url": f"sqlite:///{tmp_path / 'gw.db'}"}, "resilience": {"metrics_port": 0}}
    )
    gw = Gateway(settings, roles=["sources"])
    try:
        gw.breakers.get("source:orders")
        gw.breakers.budget("source:orders")
        gw.serve_metrics(0, addr="127.0.0.1")
        port = gw._closers[-1].__self__.server_port  # type: ignore[attr-defined]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        gw.stop(timeout=1)
    assert 'gateway_breaker_state{breaker="source:orders"} 0.0' in body
    assert 'gateway_retries_total{downstream="source:orders"} 0.0' in body
    assert gw.backpressure.threshold == settings.api.backlog_threshold
