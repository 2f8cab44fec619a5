"""Typed configuration: one YAML file plus environment overrides.

Precedence, highest first: explicit keyword overrides (CLI flags), environment variables
(``GATEWAY_`` prefix, ``__`` for nesting, e.g. ``GATEWAY_BUS__URL``), then the YAML file.
Secrets belong in the environment and reach the YAML only through ``${VAR}`` (or
``${VAR:-default}``) interpolation; they are typed ``SecretStr`` and never printed.

Every field has a ``description``; ``docs/configuration.md`` is generated from them.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigurationError
from gateway.resilience.breaker import BreakerPolicy
from gateway.resilience.budget import BudgetPolicy
from gateway.resilience.retry import RetryPolicy
from gateway.sources.rules import ParseRule

__all__ = [
    "BridgeSettings",
    "Settings",
    "StoreSettings",
    "BusSettings",
    "RelaySettings",
    "ScoringSettings",
    "ApiSettings",
    "SourceSettings",
    "MappingSettings",
    "BreakerSettings",
    "ResilienceSettings",
    "ProcessSettings",
    "load_settings",
    "format_validation_error",
    "interpolate",
]

log = logging.getLogger("gateway.config")

_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # inputs may hold secrets


class StoreSettings(_Section):
    """The gateway's own SQL store (outbox, cursors, scores, dead letters)."""

    url: SecretStr = Field(
        SecretStr("sqlite:///gateway.db"),
        description="SQLAlchemy URL of the gateway store. SQLite for the embedded mode; "
        "postgresql+psycopg://... for production.",
    )
    auto_migrate: bool = Field(
        True, description="Run Alembic migrations to head when a role starts."
    )
    pool_size: int = Field(5, ge=1, le=100, description="Connection pool size (not SQLite).")
    echo: bool = Field(False, description="Log every SQL statement (debugging only).")


class BusSettings(_Section):
    """The message bus: RabbitMQ, or the in-process bus when ``url`` is unset."""

    url: SecretStr | None = Field(
        None,
        description="AMQP URL of RabbitMQ, e.g. amqp://user:${AMQP_PASSWORD}@host:5672/vhost. "
        "Unset: the in-process bus (embedded mode, one process only).",
    )
    prefix: str = Field(
        "gateway",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$",
        description="Prefix of every exchange and queue name.",
    )
    prefetch: int = Field(1000, ge=1, le=65535, description="Consumer prefetch (QoS) per consumer.")
    delivery_limit: int = Field(
        5, ge=2, le=1000,
        description="Quorum-queue x-delivery-limit of the scoring queue: the broker's backstop against crash "
        "loops. Must exceed max_attempts (the events a crashing scorer held lose one delivery per crash).",
    )
    max_attempts: int = Field(
        3, ge=1, le=100,
        description="Attempts the gateway itself counts before dead-lettering a failing message.",
    )
    max_queue_length: int | None = Field(
        None, ge=1, description="Optional x-max-length of the scoring queue (overflow reject-publish)."
    )
    confirm_window: int = Field(
        1000, ge=1, le=100000, description="Publisher confirms kept in flight per publisher."
    )
    publish_timeout: float = Field(
        30.0, gt=0, description="Seconds to wait for the broker's confirms of one batch."
    )
    heartbeat: int = Field(30, ge=0, le=600, description="AMQP heartbeat in seconds.")
    blocked_connection_timeout: float = Field(
        60.0, gt=0, description="Seconds a connection may stay blocked by the broker before it is dropped."
    )
    socket_timeout: float = Field(10.0, gt=0, description="TCP connect/socket timeout in seconds.")
    reconnect_max_delay: float = Field(
        30.0, gt=0, description="Cap of the jittered reconnect backoff, in seconds."
    )
    watchdog_interval: float = Field(
        30.0, ge=0,
        description="Seconds between a consumer's liveness checks: a consumer that should consume, holds "
        "nothing unacked and got no delivery while its queue has ready messages for two checks in a row "
        "is re-subscribed. 0 disables the watchdog.",
    )

    @model_validator(mode="after")
    def _limit_above_attempts(self) -> BusSettings:
        if self.delivery_limit <= self.max_attempts:
            raise ValueError(
                f"delivery_limit ({self.delivery_limit}) must be greater than max_attempts ({self.max_attempts}): "
                "every message a crashing scorer holds loses one delivery per crash, and the gateway stops a "
                "crash loop only after max_attempts crashes"
            )
        return self


class RelaySettings(_Section):
    """The outbox relay: pending rows to the bus, marked published on the broker's ack."""

    batch_size: int = Field(1000, ge=1, le=50000, description="Rows claimed per batch.")
    in_flight_batches: int = Field(
        2, ge=1, le=16, description="Batches published before waiting for the oldest's confirms."
    )
    claim_seconds: float = Field(
        60.0, gt=0, description="How long a claimed batch is reserved for this relay."
    )
    idle_wait: float = Field(
        0.05, gt=0, le=10, description="Longest sleep when the outbox is empty (woken early in-process)."
    )
    retry_base_delay: float = Field(0.5, gt=0, description="First delay after a failed publish.")
    retry_max_delay: float = Field(60.0, gt=0, description="Cap of the delay between publish attempts.")


class ApiSettings(_Section):
    """The REST API."""

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8080, ge=0, le=65535, description="Bind port (0: any free port).")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body.")
    max_page_size: int = Field(500, ge=1, le=10000, description="Largest page of a list endpoint.")
    backlog_threshold: int = Field(
        100_000, ge=1, description="Pending outbox rows above which ingestion answers 503."
    )
    auth: bool = Field(
        True,
        description="Require an API key (Authorization: Bearer gw_...) on every /v1 route (docs/security.md). "
        "false is refused by profile prod; /healthz, /readyz and /metrics never need a key.",
    )
    key_secret: SecretStr | None = Field(
        None,
        description="Server secret (at least 32 characters) keying the HMAC-SHA256 digests of API keys; set it "
        "from the environment (GATEWAY_API__KEY_SECRET or ${VAR}). Required by profile prod where the API runs "
        "or keys are managed; dev and test generate one per store when unset. Changing it invalidates every key.",
    )
    rate_limit_per_second: float = Field(
        50.0, ge=0,
        description="Requests per second each API key may make (token bucket, per API process); 0 disables.",
    )
    rate_limit_burst: int = Field(
        100, ge=1, description="Requests a key may make at once before rate_limit_per_second applies."
    )

    @field_validator("key_secret")
    @classmethod
    def _key_secret_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 32:
            raise ValueError("must be at least 32 characters (e.g. the output of: openssl rand -hex 32)")
        return value


class MappingSettings(_Section):
    """How a source record becomes an event."""

    type: str = Field(..., min_length=1, description="CloudEvents type, e.g. com.acme.order.changed.")
    entity: str = Field(..., pattern=_NAME, description="Entity name, part of the event id.")
    key: list[str] = Field(..., min_length=1, description="Record fields forming the key.")
    version: str | None = Field(
        None, description="Record field whose value changes on every update (timestamp, rowversion)."
    )
    time: str | None = Field(None, description="Record field with the change time (else: read time).")
    subject: str | None = Field(
        None, description="Subject template with {field} placeholders, e.g. 'order/{id}'."
    )
    data: list[str] | None = Field(None, description="Fields copied into data (default: all).")
    rename: dict[str, str] = Field(default_factory=dict, description="Record field -> data field renames.")
    parse: dict[str, ParseRule] = Field(
        default_factory=dict,
        description="Record field -> parse rule for legacy values, applied before mapping: "
        "{type: date|datetime|decimal|int|bool|string, ...} (see docs/concepts.md#legacy-values).",
    )

    @field_validator("key")
    @classmethod
    def _unique_keys(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("key fields must be unique")
        return value


_BREAKER_DEFAULTS = BreakerPolicy()


class BreakerSettings(_Section):
    """The circuit breaker guarding one source's adapter (pauses the source while open)."""

    window_size: int = Field(
        _BREAKER_DEFAULTS.window_size, ge=1, le=10_000,
        description="Number of most recent polls (fetch attempts) the failure and slow-call rates are "
        "computed over.",
    )
    minimum_calls: int = Field(
        _BREAKER_DEFAULTS.minimum_calls, ge=1, le=10_000,
        description="Fetch attempts that must be recorded before the rates are evaluated "
        "(capped at window_size).",
    )
    failure_rate_threshold: float = Field(
        _BREAKER_DEFAULTS.failure_rate_threshold, gt=0, le=100,
        description="Percent of failed fetch attempts (transient errors: connection loss, timeouts) at or "
        "above which the breaker opens. Permanent errors (business answers) count as successes.",
    )
    slow_call_duration: float = Field(
        60.0, gt=0,
        description="Seconds above which a fetch counts as slow; the breaker also opens when every "
        "recorded fetch was slow. Legacy sources can be slow and healthy, hence a generous default; "
        ".inf switches slow-call accounting off.",
    )
    wait_in_open: float = Field(
        _BREAKER_DEFAULTS.wait_in_open, ge=0, le=86400,
        description="Seconds the source stays paused (adapter not called) before trial polls are let through.",
    )
    half_open_permits: int = Field(
        _BREAKER_DEFAULTS.half_open_permits, ge=1, le=1000,
        description="Trial fetches after the wait; the breaker closes when they stay below the thresholds, "
        "else it opens again.",
    )

    def to_policy(self) -> BreakerPolicy:
        """The :class:`~gateway.resilience.BreakerPolicy` these settings describe.

        Fields not configurable here (slow-call rate threshold, recorded and ignored exceptions)
        keep the policy's defaults.
        """
        return BreakerPolicy(
            window_size=self.window_size,
            minimum_calls=self.minimum_calls,
            failure_rate_threshold=self.failure_rate_threshold,
            slow_call_duration=self.slow_call_duration,
            wait_in_open=self.wait_in_open,
            half_open_permits=self.half_open_permits,
        )


_RETRY_DEFAULTS = RetryPolicy(attempts=6, base_delay=0.2, max_delay=5.0, deadline=30.0)
_BUDGET_DEFAULTS = BudgetPolicy()


class RetrySettings(_Section):
    """How calls to a downstream are retried after a transient error (never other errors)."""

    attempts: int = Field(
        _RETRY_DEFAULTS.attempts, ge=1, le=100, description="Most attempts per call, the first included (1: no retry)."
    )
    base_delay: float = Field(
        _RETRY_DEFAULTS.base_delay, ge=0, le=600,
        description="Scale of the full-jitter exponential backoff: the n-th wait is uniform in "
        "[0, min(max_delay, base_delay * 2^n)].",
    )
    max_delay: float = Field(_RETRY_DEFAULTS.max_delay, ge=0, le=3600, description="Cap of one wait, in seconds.")
    deadline: float = Field(
        _RETRY_DEFAULTS.deadline, ge=0, le=86400,
        description="Cap of one call's total time, retries and waits included: a wait that would end past it "
        "is not started.",
    )

    def to_policy(self) -> RetryPolicy:
        """The :class:`~gateway.resilience.RetryPolicy` these settings describe."""
        return RetryPolicy(
            attempts=self.attempts, base_delay=self.base_delay, max_delay=self.max_delay, deadline=self.deadline
        )


class RetryBudgetSettings(_Section):
    """The retry budget of a downstream: a token bucket capping retries at a share of calls."""

    ratio: float = Field(
        _BUDGET_DEFAULTS.ratio, ge=0, le=1,
        description="Tokens every call deposits; a retry costs one, so retries stay below this share of calls "
        "(plus the reserve).",
    )
    reserve: float = Field(
        _BUDGET_DEFAULTS.reserve, ge=0, le=100_000,
        description="Tokens a new budget starts with, and the most it holds (at least 1).",
    )
    min_retries_per_second: float = Field(
        _BUDGET_DEFAULTS.min_retries_per_second, ge=0, le=10_000,
        description="Tokens added per second up to the reserve, so a rarely called downstream can still retry "
        "(0: off).",
    )

    def to_policy(self) -> BudgetPolicy:
        """The :class:`~gateway.resilience.BudgetPolicy` these settings describe."""
        return BudgetPolicy(ratio=self.ratio, reserve=self.reserve, min_retries_per_second=self.min_retries_per_second)


class DownstreamResilience(_Section):
    """Overrides for one downstream; unset fields keep the ``resilience`` defaults."""

    retry: dict[str, float] = Field(
        default_factory=dict, description="Fields of resilience.retry to override, e.g. {attempts: 3}."
    )
    budget: dict[str, float] = Field(
        default_factory=dict, description="Fields of resilience.budget to override, e.g. {ratio: 0.2}."
    )

    @field_validator("retry")
    @classmethod
    def _retry_fields(cls, value: dict[str, float]) -> dict[str, float]:
        RetrySettings(**value)  # type: ignore[arg-type]  # unknown names and bad values fail here
        return value

    @field_validator("budget")
    @classmethod
    def _budget_fields(cls, value: dict[str, float]) -> dict[str, float]:
        RetryBudgetSettings(**value)  # type: ignore[arg-type]
        return value


class ResilienceSettings(_Section):
    """Retry policies and budgets per downstream, outbox backpressure on pollers, metrics of workers.

    A downstream is named like its circuit breaker: ``source:<name>`` (or the adapter's
    ``breaker_key()``, e.g. ``soap:<address>``), and ``store`` for the gateway's own store.
    """

    retry: RetrySettings = Field(default_factory=RetrySettings, description="Default retry policy of every downstream.")
    budget: RetryBudgetSettings = Field(
        default_factory=RetryBudgetSettings, description="Default retry budget of every downstream."
    )
    downstreams: dict[str, DownstreamResilience] = Field(
        default_factory=dict,
        description="Per-downstream overrides keyed by downstream name, e.g. "
        "{\"source:orders\": {retry: {attempts: 3}, budget: {ratio: 0.2}}}.",
    )
    backlog_threshold: int | None = Field(
        None, ge=1,
        description="Pending outbox rows above which source runners pause polling (state backpressure); "
        "unset: api.backlog_threshold, the same limit at which the REST API answers 503.",
    )
    backlog_resume_ratio: float = Field(
        0.9, gt=0, le=1,
        description="Paused pollers resume once the backlog is below this share of the threshold (hysteresis).",
    )
    backlog_check_interval: float = Field(
        1.0, gt=0, le=60,
        description="Seconds a counted backlog is reused by the pollers (one count per process per interval).",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of a Prometheus /metrics server in `gateway worker` processes (which have no API); "
        "unset or 0: off.",
    )

    def retry_policy(self, downstream: str, default: RetryPolicy | None = None) -> RetryPolicy:
        """The retry policy of ``downstream``: ``default`` (else ``retry``) with its overrides applied."""
        base = self.retry if default is None else RetrySettings(
            attempts=default.attempts, base_delay=default.base_delay, max_delay=default.max_delay,
            deadline=default.deadline,
        )
        over = self.downstreams.get(downstream)
        settings = RetrySettings(**{**base.model_dump(), **over.retry}) if over and over.retry else base
        return settings.to_policy()

    def budget_policy(self, downstream: str) -> BudgetPolicy:
        """The retry budget policy of ``downstream``: the defaults with its overrides applied."""
        over = self.downstreams.get(downstream)
        settings = (
            RetryBudgetSettings(**{**self.budget.model_dump(), **over.budget}) if over and over.budget else self.budget
        )
        return settings.to_policy()


class ScoringSettings(_Section):
    """The scoring worker and its built-in model."""

    class ModelBreakerSettings(BreakerSettings):
        """The circuit breaker ``scorer:<model>`` around the model call (backpressure while open)."""

        window_size: int = Field(
            20, ge=1, le=10_000,
            description="Number of most recent model calls (one per micro-batch, one per event in a half-open "
            "trial) the failure and slow-call rates are computed over.",
        )
        minimum_calls: int = Field(
            10, ge=1, le=10_000,
            description="Model calls that must be recorded before the rates are evaluated (capped at window_size).",
        )
        failure_rate_threshold: float = Field(
            50.0, gt=0, le=100,
            description="Percent of failed model calls at or above which the breaker opens. Every model exception "
            "counts as a failure (a call over score_timeout too), except permanent errors (bad input, malformed "
            "answer), which count as successes.",
        )
        slow_call_duration: float = Field(
            10.0, gt=0,
            description="Seconds above which a model call counts as slow; the breaker also opens when every "
            "recorded call was slow. .inf switches slow-call accounting off.",
        )
        wait_in_open: float = Field(
            15.0, ge=0, le=86400,
            description="Seconds the workers take no deliveries (consumers paused, events wait in the queue) "
            "before a trial.",
        )
        half_open_permits: int = Field(
            3, ge=1, le=1000,
            description="Trial calls after the wait, one event each; it is also the workers' prefetch during the "
            "trial. The breaker closes when they stay below the thresholds, else it opens again.",
        )

    class ModelSettings(_Section):
        """``scoring.models.<name>``: one named model instance, its scorer kind (plugin) and options."""

        kind: str = Field(
            ..., min_length=1,
            description="Scorer kind: the name of a gateway.scorers entry point, e.g. online-anomaly or rules "
            "(docs/scoring.md, Models, lists the built-in kinds).",
        )
        options: dict[str, Any] = Field(
            default_factory=dict,
            description="Options of the scorer kind, checked by its factory when the scorer is built (see "
            "docs/scoring.md, Models).",
        )

    class ShadowSettings(_Section):
        """``scoring.shadow``: a second model scoring a deterministic sample of events, stored, not published."""

        model: str = Field(
            ..., min_length=1,
            description="The shadow model: a name in scoring.models, or else a scorer kind used with empty options.",
        )
        fraction: float = Field(
            0.1, ge=0.0, le=1.0, allow_inf_nan=False,
            description="Share of events (chosen by a hash of the event id, so a redelivery decides the same) "
            "that the shadow model scores too, after the primary.",
        )

    class RouteSettings(_Section):
        """``scoring.routes[]``: the events of some types scored by their own model, queue and workers."""

        name: str = Field(
            ..., pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$",
            description="Route name (lowercase, digits, - or _); its queue is <prefix>.scoring.<name>, its retry "
            "levels <prefix>.scoring.<name>.retry.<ttl>ms.",
        )
        types: list[str] = Field(
            ..., min_length=1,
            description="Event-type patterns of this route, AMQP topic style: '*' one word, '#' zero or more "
            "(e.g. 'payments.#'). The patterns of different routes may not overlap; events of no route go to "
            "the default route (scoring.model).",
        )
        model: str = Field(
            ..., min_length=1,
            description="The route's model: a name in scoring.models, or else a scorer kind used with empty options.",
        )
        fallback: str | None = Field(
            None, min_length=1,
            description="The route's fallback model while its model's breaker is open. Left out: scoring.fallback "
            "(if any); null: none (the route's intake pauses instead).",
        )
        shadow: ScoringSettings.ShadowSettings | None = Field(
            None, description="The route's shadow model {model, fraction} (not inherited from scoring.shadow).",
        )

        @field_validator("types")
        @classmethod
        def _patterns_valid(cls, value: list[str]) -> list[str]:
            from gateway.events.topics import check_pattern

            return [check_pattern(p) for p in value]

    model: str = Field(
        "online-anomaly",
        description="The model that scores: a name in scoring.models, or else a scorer kind used with empty "
        "options (e.g. online-anomaly).",
    )
    fallback: str | None = Field(
        None, min_length=1,
        description="Model that scores while the primary model's breaker is open (e.g. a rules model), instead "
        "of pausing intake; its scores are stored under its own name and the scored events carry the "
        "extension degraded=true. None: pause intake (backpressure) as without a fallback.",
    )
    shadow: ShadowSettings | None = Field(
        None,
        description="Shadow scoring: {model, fraction}. The sampled events are scored by the shadow model too "
        "and its scores stored as ordinary score rows of that model (not published); compare with "
        "'gateway scoring compare' or GET /v1/scoring/compare.",
    )
    routes: list[RouteSettings] = Field(
        default_factory=list,
        description="Model routes by event type: [{name, types, model, fallback, shadow}]. Each route has its "
        "own queue (<prefix>.scoring.<name>), breaker, retries, backpressure and workers, so one route's model "
        "outage never stalls another route. Events of no route are scored by scoring.model from <prefix>.scoring.",
    )
    late_after: float | None = Field(
        None, ge=1, le=7 * 86400,
        description="Seconds an event may wait for its score, counted from the relay's publish (retries "
        "included). An event older than this is not scored but routed to the late queue <prefix>.late "
        "(exchange <prefix>.late, routing key = event type) for a consumer of your own; while a model's "
        "breaker is open and no fallback scores, waiting events are parked in the retry levels (no attempt "
        "counted) instead of pausing intake, so they become late on time. None: no deadline.",
    )
    checkpoint_interval: float = Field(
        60.0, ge=0, le=86400,
        description="Seconds between checkpoints of a learning model's state (the built-in online-anomaly) in "
        "the store; a restarted scorer resumes from the last one. 0: no checkpoints (a restart forgets).",
    )
    models: dict[str, ModelSettings] = Field(
        default_factory=dict,
        description="Named model instances, name -> {kind, options}; scoring.model (and later fallbacks and "
        "shadows) refer to them by name. The name is stored with every score.",
    )
    batch_max: int = Field(
        500, ge=1, le=10000,
        description="Largest micro-batch. Batches are only this large under backlog; at low rates "
        "the linger bounds them.",
    )
    batch_linger_ms: float = Field(
        10.0, ge=0, le=5000, description="Longest wait to fill a micro-batch once it has one event."
    )
    workers: int = Field(
        2, ge=1, le=16,
        description="Worker threads per scorer process, each with its own consumer, sharing one model; "
        "they overlap waiting for the store and the broker's confirms.",
    )
    warmup: int = Field(
        30, ge=1, description="Events per type seen before the built-in model gives real scores."
    )
    exclude_fields: list[str] = Field(
        default_factory=lambda: ["id"],
        description="Data fields never used as features (keys, ids). Fields ending in _id are excluded too.",
    )
    retry_min_delay: float = Field(
        1.0, ge=0, le=3600,
        description="Shortest delay in seconds before a transiently failed event is scored again (it waits "
        "in a TTL retry queue, <prefix>.scoring.retry.<ttl>ms; the worker keeps serving other events).",
    )
    retry_base_delay: float = Field(
        1.0, gt=0, le=3600,
        description="Cap of the first retry delay in seconds; the cap doubles per failed attempt "
        "(full jitter: each delay is uniform between retry_min_delay and the cap).",
    )
    retry_max_delay: float = Field(
        60.0, gt=0, le=86400,
        description="Largest cap of one retry delay in seconds. Changing the retry delays declares new "
        "retry queues; bus.max_attempts bounds the attempts.",
    )
    retry_window: float = Field(
        300.0, gt=0, le=604800,
        description="Largest sum in seconds of all retry delays of one event; once it is used up the next "
        "failure dead-letters the event even before bus.max_attempts.",
    )
    score_timeout: float = Field(
        30.0, gt=0, le=3600,
        description="Seconds one model call (one micro-batch) may take; a longer call counts as a failure "
        "of the model (the worker stops waiting for it).",
    )
    breaker: ModelBreakerSettings = Field(
        default_factory=ModelBreakerSettings,
        description="Circuit breaker 'scorer:<model>' around the model call. While it is open the workers take "
        "no deliveries (backpressure: the events wait in the queue, no attempt is counted); half-open, they "
        "take half_open_permits events as trial calls; closed again, the prefetch doubles per good batch up "
        "to bus.prefetch.",
    )

    @field_validator("models")
    @classmethod
    def _model_names_valid(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name)]
        if bad:
            raise ValueError(
                f"model names must be 1-64 letters, digits, '.', '_' or '-' (they name breakers and scores): {bad}"
            )
        return value

    @model_validator(mode="after")
    def _retry_delays_consistent(self) -> ScoringSettings:
        problems = [
            msg
            for bad, msg in (
                (self.retry_max_delay < self.retry_base_delay, "retry_max_delay must be >= retry_base_delay"),
                (self.retry_max_delay < self.retry_min_delay, "retry_max_delay must be >= retry_min_delay"),
                (self.retry_window < self.retry_min_delay, "retry_window must be >= retry_min_delay"),
            )
            if bad
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _routes_distinct(self) -> ScoringSettings:
        from gateway.events.topics import topics_overlap

        problems = []
        for where, route in [("scoring", self.for_route(None))] + [
            (f"scoring.routes[{i}] ({r.name!r})", self.for_route(r.name)) for i, r in enumerate(self.routes)
        ]:
            if route.fallback is not None and route.fallback == route.model:
                problems.append(f"{where}: fallback must name another model than its model ({route.model!r})")
            if route.shadow is not None and route.shadow.model == route.model:
                problems.append(f"{where}: shadow.model must name another model than its model ({route.model!r})")
        names = [r.name for r in self.routes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"scoring.routes: route names must be unique, repeated: {dup}")
        reserved = sorted({n for n in names if n in ("retry", "default", "router")})
        if reserved:
            problems.append(f"scoring.routes: {reserved} are reserved names (they name the gateway's own queues)")
        for i, a in enumerate(self.routes):
            for b in self.routes[i + 1:]:
                clash = [(p, q) for p in a.types for q in b.types if topics_overlap(p, q)]
                if clash:
                    p, q = clash[0]
                    problems.append(
                        f"scoring.routes: {a.name!r} pattern {p!r} and {b.name!r} pattern {q!r} can match the same "
                        f"event type; an event type must belong to one route at most"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def route_names(self) -> list[str | None]:
        """``None`` (the default route) and then every configured route's name."""
        return [None, *(r.name for r in self.routes)]

    def for_route(self, name: str | None) -> ScoringSettings:
        """These settings as seen by one route's workers: its model, fallback and shadow, no routes.

        Args:
            name: a route name, or ``None`` for the default route (scoring.model, .fallback, .shadow).

        Raises:
            KeyError: no route has that name.
        """
        if name is None:
            if not self.routes:
                return self
            return self.model_copy(update={"routes": []})
        route = next((r for r in self.routes if r.name == name), None)
        if route is None:
            raise KeyError(f"no scoring route {name!r}; configured: {[r.name for r in self.routes]}")
        fallback = route.fallback if "fallback" in route.model_fields_set else self.fallback
        return self.model_copy(update={"model": route.model, "fallback": fallback, "shadow": route.shadow, "routes": []})


ScoringSettings.RouteSettings.model_rebuild()  # resolve its reference to ScoringSettings.ShadowSettings


class BridgeSettings(_Section):
    """Forwarding scored events back to a legacy queue, in a legacy format (the ``bridge`` role)."""

    name: str = Field(..., pattern=_NAME, description="Bridge name; its gateway queue is <prefix>.bridge.<name>.")
    types: list[str] = Field(
        default_factory=lambda: ["#"], min_length=1,
        description="Original event types to forward (AMQP topic patterns on the scored exchange).",
    )
    url: SecretStr = Field(..., description="AMQP URL of the LEGACY broker; use ${ENV} for the password.")
    exchange: str = Field("", description="Legacy exchange to publish to ('' = the default exchange).")
    routing_key: str = Field(..., min_length=1, description="Routing key (with the default exchange: the legacy queue).")
    codec: dict[str, Any] = Field(..., description="Legacy format of the message body (see docs/codecs.md).")
    fields: dict[str, str] = Field(
        ..., min_length=1,
        description="Legacy record field -> dotted path into the scored event, e.g. "
        "{booking_no: data.event.data.booking_no, score: data.score, model: data.model.version}.",
    )
    content_type: str = Field("application/octet-stream", description="content_type of the published messages.")
    min_score: float | None = Field(None, ge=0, le=1, description="Forward only events scored at least this high.")
    batch_max: int = Field(100, ge=1, le=5000, description="Most scored events forwarded per publish batch.")


class SourceSettings(_Section):
    """One configured source: which adapter, its settings, and the mapping."""

    name: str = Field(..., pattern=_NAME, description="Unique source name (lowercase, digits, - or _).")
    adapter: str = Field(..., description="Adapter plugin name (entry point in gateway.adapters).")
    enabled: bool = Field(True, description="Disabled sources are validated but not polled.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Adapter settings, validated by the adapter's config model."
    )
    mapping: MappingSettings = Field(..., description="Record-to-event mapping.")
    interval: float = Field(
        1.0, gt=0, le=86400, description="Seconds between polls when the last poll found nothing new."
    )
    breaker: BreakerSettings = Field(
        default_factory=BreakerSettings,
        description="Circuit breaker around the adapter's fetch; while it is open the source is paused.",
    )
    status_interval: float = Field(
        5.0, gt=0, le=3600,
        description="Seconds between the runner's status writes to the store (state changes are written at "
        "once) and its checks for operator commands (gateway sources pause/resume/accept-drift).",
    )
    lease_ttl: float = Field(
        30.0, gt=0, le=3600,
        description="Seconds a runner's lease on the source lasts: one replica polls the source, renewing the "
        "lease every lease_ttl/3; the others wait as standby and one takes over once the lease expired, at most "
        "lease_ttl after the holder's last renewal. Replica clocks must agree to well under this.",
    )


_YAML_DATA: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("_YAML_DATA", default={})


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _YAML_DATA.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_YAML_DATA.get())


class ProcessSettings(_Section):
    """Tuning of the long-running gateway process (``gateway run``, ``gateway worker``, ``gateway api``)."""

    gc_freeze: bool = Field(
        True,
        description="After start-up, move every object alive then (modules, config, models) to Python's permanent "
        "generation (gc.freeze), so full collections no longer walk them (docs/performance.md).",
    )
    gc_threshold: int = Field(
        10000, ge=100, le=1_000_000,
        description="Allocations between young-generation collections (Python's default is 700); a batch of "
        "events allocates thousands of short-lived containers, and collecting every 700 cost about a sixth of "
        "the gateway's CPU in the end-to-end benchmark. 700 restores Python's default.",
    )


class ObservabilitySettings(_Section):
    """Metrics collectors and OpenTelemetry tracing (docs/observability.md)."""

    tracing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="OpenTelemetry spans (needs the otel extra): auto is on when OTEL_EXPORTER_OTLP_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set and the extra is installed; on without the extra is an error.",
    )
    service_name: str = Field(
        "legacy-gateway", min_length=1, description="OpenTelemetry service.name (OTEL_SERVICE_NAME wins when set)."
    )
    metrics_cache_seconds: float = Field(
        5.0, ge=0, le=300,
        description="Seconds a scrape-time read (outbox, dead letters, source lag, queue depths) is reused.",
    )
    queue_metrics: bool = Field(
        True,
        description="Export gateway_queue_messages and gateway_queue_consumers (on RabbitMQ: a short-lived "
        "connection of its own per refresh, passive declares).",
    )


class ContractSettings(_Section):
    """A JSON-Schema contract for the event types matching ``types`` (docs/governance.md)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, hide_input_in_errors=True)

    types: list[str] = Field(
        ..., min_length=1,
        description="Event type patterns (AMQP topic syntax: * one word, # any); the first matching contract applies.",
    )
    mode: Literal["evolve", "freeze", "discard"] = Field(
        "evolve",
        description="evolve: accept additive changes and bump the schema version; freeze: reject violations as "
        "dead letters; discard: drop violations (counted and logged, no dead letter).",
    )
    schema_: dict[str, Any] | bool | str | None = Field(
        None, alias="schema",
        description="YAML key 'schema': the JSON Schema of the events' data, inline or the path of a JSON file "
        "(relative to the working directory); unset: inferred from the first events of each type and source.",
    )
    infer_required: bool = Field(
        True, description="Inferred schemas make the fields present in all first events required."
    )

    @field_validator("types")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        from gateway.events.topics import check_pattern

        return [check_pattern(p) for p in value]

    @field_validator("schema_")
    @classmethod
    def _schema(cls, value: Any) -> Any:
        from gateway.governance import check_schema, load_schema

        schema = load_schema(value, "schema")
        if schema is not None:
            check_schema(schema)
        return schema


class PiiPolicySettings(_Section):
    """A PII policy: an action on a field path, for some event types (docs/governance.md)."""

    path: str = Field(..., description="Field path, e.g. data.customer.email, data.cards[*].number, or subject.")
    action: Literal["drop", "mask", "hash", "tokenize"] = Field(
        ..., description="drop the field; mask it ('****'); keyed hash (HMAC-SHA256, hex); tokenize (keyed, "
        "format-preserving, not reversible).",
    )
    types: list[str] = Field(["#"], min_length=1, description="Event type patterns the policy applies to.")
    keep_last: int = Field(0, ge=0, le=16, description="mask only: trailing characters left visible.")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        from gateway.governance import compile_path

        compile_path(value)
        return value

    @field_validator("types")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        from gateway.events.topics import check_pattern

        return [check_pattern(p) for p in value]


class PiiSettings(_Section):
    """PII policies, applied to every event before the store accepts it (decision 0011)."""

    secret: SecretStr | None = Field(
        None,
        description="Key of hash and tokenize (at least 32 characters), from the environment (${VAR}); "
        "changing it changes every hash and token.",
    )
    policies: list[PiiPolicySettings] = Field(default_factory=list, description="Policies, applied in order.")

    @field_validator("secret")
    @classmethod
    def _secret_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 32:
            raise ValueError("must be at least 32 characters (e.g. the output of: openssl rand -hex 32)")
        return value

    @model_validator(mode="after")
    def _secret_needed(self) -> PiiSettings:
        for i, pol in enumerate(self.policies):
            if pol.action in ("hash", "tokenize") and self.secret is None:
                raise ValueError(f"policies[{i}] ({pol.action} {pol.path}) needs governance.pii.secret")
        return self


class GovernanceSettings(_Section):
    """Contracts per event type and PII policies (docs/governance.md)."""

    contracts: list[ContractSettings] = Field(default_factory=list, description="JSON-Schema contracts, in order.")
    schema_change_type: str = Field(
        "{type}.schema-changed",
        description="CloudEvents type of schema-change events; {type} is the changed event type.",
    )
    pii: PiiSettings = Field(default_factory=PiiSettings, description="PII policies.")

    @field_validator("schema_change_type")
    @classmethod
    def _change_type(cls, value: str) -> str:
        from gateway.events.topics import check_pattern

        try:
            check_pattern(value.format(type="com.example.type").replace("*", "x").replace("#", "x"))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"expected a dotted event type, optionally with {{type}}: {exc}") from None
        return value


def _check_amqp_transport(field: str, raw_url: str, profile: str) -> None:
    """SEC-05 for one AMQP URL outside dev (see :meth:`Settings._prod_transport_security`).

    Raises:
        ValueError: naming ``field`` and the rule (never the URL: it may hold a password).
    """
    import ast
    import ssl
    from urllib.parse import parse_qs, urlsplit

    where = f"{field}: profile {profile}"
    url = urlsplit(raw_url)
    host = url.hostname or "localhost"  # pika's default host
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if (url.username or "guest") == "guest" and (profile == "prod" or not loopback):
        raise ValueError(f"{where} refuses the 'guest' broker user; create a user for the gateway")
    if url.scheme == "amqp" and not loopback:
        raise ValueError(f"{where} refuses plaintext amqp:// to {url.hostname}; use amqps:// (TLS)")
    if url.scheme != "amqps":
        return
    for raw in parse_qs(url.query).get("ssl_options", []):  # pika: ast.literal_eval of the value
        try:
            opts = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: ssl_options is not a Python literal dict") from None
        if not isinstance(opts, dict):
            raise ValueError(f"{where}: amqps:// needs ssl_options to be a dict (None disables TLS)")  # noqa: TRY004
        # pika builds ssl.SSLContext(opts['protocol']); only PROTOCOL_TLS_CLIENT verifies by default
        try:
            context = ssl.SSLContext(opts.get("protocol", ssl.PROTOCOL_TLS_CLIENT))
        except (ValueError, TypeError, OSError):
            raise ValueError(f"{where}: ssl_options protocol is not an ssl.PROTOCOL_* value") from None
        off = [
            k for k, ok in (
                ("protocol", context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname),
                ("cert_reqs", opts.get("cert_reqs", ssl.CERT_REQUIRED) == ssl.CERT_REQUIRED),
                ("verify_mode", opts.get("verify_mode", ssl.CERT_REQUIRED) == ssl.CERT_REQUIRED),
                ("check_hostname", opts.get("check_hostname", True) is True),
            ) if k in opts and not ok
        ]
        if off:
            raise ValueError(
                f"{where} requires TLS certificate and hostname verification (CERT_REQUIRED, "
                f"check_hostname); ssl_options {', '.join(off)} would turn it off"
            )
    return


class Settings(BaseSettings):
    """All gateway settings."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True,
        hide_input_in_errors=True,  # a URL or password in the input must not reach an error message
    )

    profile: Literal["dev", "test", "prod"] = Field(
        "dev",
        description="test and prod refuse the 'guest' broker user and plaintext amqp:// to non-loopback hosts, "
        "and amqps:// ssl_options that turn off certificate or hostname verification; prod refuses 'guest' on "
        "loopback too and requires API keys; dev allows all of these.",
    )
    governance: GovernanceSettings = Field(
        default_factory=GovernanceSettings,
        description="Contracts per event type and PII policies, applied before acceptance (docs/governance.md).",
    )
    store: StoreSettings = Field(default_factory=StoreSettings, description="Gateway store.")
    bus: BusSettings = Field(default_factory=BusSettings, description="Message bus.")
    relay: RelaySettings = Field(default_factory=RelaySettings, description="Outbox relay.")
    scoring: ScoringSettings = Field(default_factory=ScoringSettings, description="Scoring worker.")
    api: ApiSettings = Field(default_factory=ApiSettings, description="REST API.")
    resilience: ResilienceSettings = Field(
        default_factory=ResilienceSettings,
        description="Retry policies and budgets, poller backpressure and worker metrics (docs/resilience.md).",
    )
    sources: list[SourceSettings] = Field(default_factory=list, description="Configured sources.")
    bridges: list[BridgeSettings] = Field(
        default_factory=list, description="Forwarders of scored events back to legacy queues (the bridge role)."
    )
    observability: ObservabilitySettings = Field(
        default_factory=ObservabilitySettings, description="Metrics collectors and tracing (docs/observability.md)."
    )
    process: ProcessSettings = Field(
        default_factory=ProcessSettings, description="Garbage-collector tuning of long-running processes."
    )

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, value: list[SourceSettings]) -> list[SourceSettings]:
        seen: set[str] = set()
        for src in value:
            if src.name in seen:
                raise ValueError(f"duplicate source name {src.name!r}")
            seen.add(src.name)
        return value

    @model_validator(mode="after")
    def _prod_api_auth(self) -> Settings:
        """Profile prod never serves the API without keys (api.auth)."""
        if self.profile == "prod" and not self.api.auth:
            raise ValueError("api.auth: profile prod requires API keys; auth: false is allowed only in dev and test")
        return self

    @model_validator(mode="after")
    def _prod_transport_security(self) -> Settings:
        """SEC-05 outside dev: no ``guest`` user or plaintext amqp:// to another host, TLS that verifies.

        test and prod: ``guest`` and plaintext ``amqp://`` only on loopback, and an ``amqps://`` URL's
        ``ssl_options`` (parsed as pika's URLParameters does) must keep CERT_REQUIRED and
        check_hostname. prod also refuses ``guest`` on loopback. Checked for the gateway's broker,
        each bridge's legacy broker and each legacy-queue (amqp) source's broker.
        """
        if self.profile == "dev":
            return self
        urls = [("bus.url", self.bus.url)] + [(f"bridges[{i}].url", b.url) for i, b in enumerate(self.bridges)]
        urls += [
            (f"sources[{i}].config.url", SecretStr(str(src.config["url"])))
            for i, src in enumerate(self.sources)
            if src.adapter == "amqp" and isinstance(src.config.get("url"), (str, SecretStr))
        ]
        for field, url in urls:
            if url is not None:
                _check_amqp_transport(field, url.get_secret_value(), self.profile)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    def source(self, name: str) -> SourceSettings:
        """The source called ``name``; raises ConfigurationError listing the known names."""
        for src in self.sources:
            if src.name == name:
                return src
        known = ", ".join(s.name for s in self.sources) or "none configured"
        raise ConfigurationError(f"unknown source {name!r} (known: {known})")


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, environ: dict[str, str] | None = None, where: str = "<config>") -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; ``${VAR_FILE}`` style is read from the file.

    Raises:
        ConfigurationError: when a variable without default is unset.
    """
    env = os.environ if environ is None else environ

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        file_var = env.get(name + "_FILE")
        if file_var:
            return Path(file_var).read_text(encoding="utf-8").strip()
        if default is not None:
            return default
        line = text.count("\n", 0, match.start()) + 1
        raise ConfigurationError(
            f"{where}:{line}: environment variable {name} is not set "
            f"(set it, set {name}_FILE, or write ${{{name}:-default}})"
        )

    return _VAR.sub(sub, text)


#: Keys whose values are secrets: in a configuration file they must be ``${VAR}`` references.
SECRET_KEYS = frozenset({"password", "passphrase", "secret", "client_secret", "token", "api_key", "private_key",
                         "key_secret"})
_ONLY_VAR = re.compile(r"\s*\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}\s*")


def literal_secrets(raw: Any, path: str = "") -> list[str]:
    """Paths of secret-named keys whose value in the *uninterpolated* YAML is not one ``${VAR}``.

    Secrets come only from the environment (``${VAR}``, or ``VAR_FILE`` naming a file), never
    written into a configuration file that ends up in version control or a container image.
    """
    found: list[str] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key).lower() in SECRET_KEYS and value is not None and not isinstance(value, (dict, list)):
                if not (isinstance(value, str) and _ONLY_VAR.fullmatch(value)):
                    found.append(where)
            else:
                found.extend(literal_secrets(value, where))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            found.extend(literal_secrets(value, f"{path}[{i}]"))
    return found


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line per problem: ``FILE: path.in[0].file: message (got VALUE)``."""
    lines = []
    for err in exc.errors(include_url=False):
        got = err.get("input")
        shown = ""
        if err["type"] != "missing" and not isinstance(got, (dict, list)):
            text = repr(got)
            shown = f" (got {text[:80]})" if "secret" not in _loc(err["loc"]).lower() else ""
        lines.append(f"{where}: {_loc(err['loc'])}: {err['msg']}{shown}")
    return "\n".join(lines)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings.

    Args:
        path: YAML file; ``None`` uses ``$GATEWAY_CONFIG`` if set, else defaults + environment.
        **overrides: highest-precedence values (from CLI flags).

    Raises:
        ConfigurationError: naming the file, the path inside it and what was expected.
    """
    if path is None and os.environ.get("GATEWAY_CONFIG"):
        path = os.environ["GATEWAY_CONFIG"]
    where = str(path) if path is not None else "<environment>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigurationError(f"{where}: configuration file not found")
        raw_text = p.read_text(encoding="utf-8")
        text = interpolate(raw_text, where=where)
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise ConfigurationError(f"{where}{pos}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"{where}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    token = _YAML_DATA.set(data)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(exc, where)) from None
    finally:
        _YAML_DATA.reset(token)
    if path is not None:
        _check_literal_secrets(raw_text, where, settings.profile)
    return settings


def _check_literal_secrets(raw_text: str, where: str, profile: str) -> None:
    """Secrets written into the file: an error in prod, a warning in dev and test."""
    try:
        raw = yaml.safe_load(raw_text)
    except yaml.YAMLError:
        return  # the interpolated text parsed; the raw one need not (a ${VAR} inside flow syntax)
    found = literal_secrets(raw)
    if not found:
        return
    msg = "; ".join(
        f"{where}: {p}: a secret must come from the environment: write ${{VAR}} (or set VAR_FILE to a file)"
        for p in found
    )
    if profile == "prod":
        raise ConfigurationError(msg)
    log.warning("%s (profile %s allows it; prod refuses it)", msg, profile)
