"""The gateway's exchange and queue names and arguments (a **contract**: see docs/concepts.md).

* ``<prefix>.events``  -- topic exchange; the relay publishes events with routing key = type.
* ``<prefix>.scoring`` -- quorum queue bound to ``events`` with ``#``; the scorer consumes it.
* ``<prefix>.scored``  -- topic exchange; scored events, routing key = the original event type.
* ``<prefix>.dlx``     -- fanout dead-letter exchange, declared first.
* ``<prefix>.dead``    -- quorum dead-letter queue bound to ``dlx``.
* ``<prefix>.retry``   -- direct exchange of the delayed retries (REL-08): routing key
  ``<prefix>.scoring.retry.<ttl>ms`` reaches that retry level, routing key ``<prefix>.scoring``
  reaches the scoring queue (where expired retries return, and where operators may replay).
* ``<prefix>.scoring.retry.<ttl>ms`` -- one quorum queue per retry level, not consumed:
  ``x-message-ttl`` = the level's cap, dead-lettered on expiry to ``retry`` with routing key
  ``<prefix>.scoring`` (see :mod:`gateway.bus.retry`). Named by TTL, so changing the retry settings
  declares new levels instead of failing on the old ones; an emptied old level can be deleted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.bus.retry import RetrySchedule
from gateway.config import BusSettings, ScoringSettings

__all__ = ["DeclaredTopology", "Topology", "QueueSpec", "topic_matches"]


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue with its arguments and bindings (exchange, pattern)."""

    name: str
    arguments: dict[str, Any]
    bindings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Topology:
    """Names and arguments derived from the bus (and scoring) settings.

    ``retry_ttls_ms`` are the retry levels (queue TTLs in ms); the default is what the default
    scoring settings need with ``bus.max_attempts=3``.
    """

    prefix: str
    delivery_limit: int = 5
    max_queue_length: int | None = None
    extra_queues: tuple[QueueSpec, ...] = field(default=())
    retry_ttls_ms: tuple[int, ...] = field(default=RetrySchedule().level_ttls_ms(3))

    @classmethod
    def from_settings(cls, settings: BusSettings, scoring: ScoringSettings | None = None) -> Topology:
        """Topology for ``settings``; the retry levels follow ``scoring`` (default: its defaults).

        Every process declaring the topology must pass the same scoring settings, or they declare
        different retry levels (harmless, but levels only one side uses).
        """
        schedule = RetrySchedule.from_settings(scoring if scoring is not None else ScoringSettings())
        return cls(
            settings.prefix, settings.delivery_limit, settings.max_queue_length,
            retry_ttls_ms=schedule.level_ttls_ms(settings.max_attempts),
        )

    def bridge_queue(self, name: str) -> str:
        """The gateway-side queue of bridge ``name`` (scored events waiting to go to a legacy queue)."""
        return f"{self.prefix}.bridge.{name}"

    def with_bridges(self, bridges: Iterable[Any]) -> Topology:
        """This topology plus one quorum queue per bridge, bound to the scored exchange by its types."""
        extra = tuple(
            QueueSpec(
                self.bridge_queue(b.name),
                {
                    "x-queue-type": "quorum",
                    "x-dead-letter-exchange": self.dead_letter_exchange,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                    "x-delivery-limit": self.delivery_limit,
                },
                tuple((self.scored_exchange, pattern) for pattern in b.types),
            )
            for b in bridges
        )
        return replace(self, extra_queues=self.extra_queues + extra) if extra else self

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def scored_exchange(self) -> str:
        return f"{self.prefix}.scored"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def scoring_queue(self) -> str:
        return f"{self.prefix}.scoring"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def retry_exchange(self) -> str:
        return f"{self.prefix}.retry"

    def retry_queue(self, ttl_ms: int) -> str:
        """The retry level whose messages wait at most ``ttl_ms``."""
        return f"{self.scoring_queue}.retry.{ttl_ms}ms"

    def retry_level(self, delay_ms: int) -> tuple[str, int] | None:
        """(queue, ttl) of the shortest declared level holding ``delay_ms``; else the longest level.

        Returns:
            ``None`` when no retry level is declared (``bus.max_attempts`` = 1).
        """
        if not self.retry_ttls_ms:
            return None
        ttl = next((t for t in sorted(self.retry_ttls_ms) if t >= delay_ms), max(self.retry_ttls_ms))
        return self.retry_queue(ttl), ttl

    def exchanges(self) -> list[tuple[str, str]]:
        """(name, type) in declaration order: the DLX first."""
        return [
            (self.dead_letter_exchange, "fanout"), (self.events_exchange, "topic"), (self.scored_exchange, "topic"),
            (self.retry_exchange, "direct"),
        ]

    def queues(self) -> list[QueueSpec]:
        """Every queue, dead-letter queue first. Every argument is explicit (REL-03)."""
        scoring_args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": self.delivery_limit,
        }
        if self.max_queue_length is not None:
            scoring_args["x-max-length"] = self.max_queue_length
        dead_args: dict[str, Any] = {"x-queue-type": "quorum", "x-overflow": "reject-publish"}
        return [
            QueueSpec(self.dead_letter_queue, dead_args, ((self.dead_letter_exchange, ""),)),
            QueueSpec(
                self.scoring_queue, scoring_args,
                ((self.events_exchange, "#"), (self.retry_exchange, self.scoring_queue)),
            ),
            *self.retry_queues(),
            *self.extra_queues,
        ]

    def retry_queues(self) -> list[QueueSpec]:
        """The retry levels (REL-08): expired messages go back to the scoring queue.

        Dead-lettering is at-least-once (it needs ``reject-publish``): an expired message stays in
        its level until the scoring queue accepted it, even when that queue is full.
        """
        return [
            QueueSpec(
                self.retry_queue(ttl),
                {
                    "x-queue-type": "quorum",
                    "x-message-ttl": ttl,
                    "x-dead-letter-exchange": self.retry_exchange,
                    "x-dead-letter-routing-key": self.scoring_queue,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                    "x-delivery-limit": self.delivery_limit,
                },
                ((self.retry_exchange, self.retry_queue(ttl)),),
            )
            for ttl in sorted(set(self.retry_ttls_ms))
        ]


@dataclass(frozen=True, slots=True)
class DeclaredTopology:
    """An explicit list of exchanges and queues to declare: a legacy broker's (often nothing)."""

    exchange_specs: tuple[tuple[str, str], ...] = ()
    queue_specs: tuple[QueueSpec, ...] = ()

    def exchanges(self) -> list[tuple[str, str]]:
        return list(self.exchange_specs)

    def queues(self) -> list[QueueSpec]:
        return list(self.queue_specs)


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    p, k = pattern.split("."), key.split(".") if key else []

    def match(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(k)
        if p[i] == "#":
            return any(match(i + 1, jj) for jj in range(j, len(k) + 1))
        if j == len(k):
            return False
        return (p[i] == "*" or p[i] == k[j]) and match(i + 1, j + 1)

    return match(0, 0)
