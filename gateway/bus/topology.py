"""The gateway's exchange and queue names and arguments (a **contract**: see docs/concepts.md).

* ``<prefix>.events``  -- topic exchange; the relay publishes events with routing key = type.
* ``<prefix>.scoring.router`` -- topic exchange bound to ``events`` with ``#`` (exchange-to-exchange);
  each scoring route's queue binds to it with the route's type patterns. Its alternate exchange is
  ``<prefix>.scoring.default``: an event no route's pattern matches goes there.
* ``<prefix>.scoring.default`` -- fanout exchange; the default scoring queue is bound to it.
* ``<prefix>.scoring`` -- quorum queue of the default route (``scoring.model``): every event of no
  route; ``<prefix>.scoring.<route>`` -- one quorum queue per ``scoring.routes`` entry. Route
  patterns may not overlap (config validation), so every event reaches exactly one scoring queue.
* ``<prefix>.scored``  -- topic exchange; scored events, routing key = the original event type.
* ``<prefix>.dlx``     -- fanout dead-letter exchange, declared first.
* ``<prefix>.dead``    -- quorum dead-letter queue bound to ``dlx``.
* ``<prefix>.retry``   -- direct exchange of the delayed retries (REL-08): routing key
  ``<queue>.retry.<ttl>ms`` reaches that retry level of a scoring queue, routing key ``<queue>``
  reaches the scoring queue itself (where expired retries return, and where operators may replay).
* ``<queue>.retry.<ttl>ms`` -- per scoring queue, one quorum queue per retry level, not consumed:
  ``x-message-ttl`` = the level's cap, dead-lettered on expiry to ``retry`` with routing key
  ``<queue>`` (see :mod:`gateway.bus.retry`). Named by TTL, so changing the retry settings
  declares new levels instead of failing on the old ones; an emptied old level can be deleted.

Before scoring routes existed, ``<prefix>.scoring`` was bound to ``events`` with ``#`` directly;
:meth:`Topology.obsolete_bindings` lists that binding, and declaring the topology removes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.bus.retry import RetrySchedule
from gateway.config import BusSettings, ScoringSettings
from gateway.events.topics import topic_matches

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
    routes: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())  #: (route name, type patterns)
    route: str | None = None  #: the scoring route this view's ``scoring_queue`` is (None: the default)
    late: bool = False  #: declare the late exchange and queue (``scoring.late_after`` is set)

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
            routes=tuple((r.name, tuple(r.types)) for r in scoring.routes) if scoring is not None else (),
            late=scoring is not None and scoring.late_after is not None,
        )

    def for_route(self, name: str | None) -> Topology:
        """The same topology seen by one scoring route: ``scoring_queue`` and its retry levels are the route's.

        Raises:
            KeyError: no route has that name.
        """
        if name is not None and name not in dict(self.routes):
            raise KeyError(f"no scoring route {name!r}; configured: {[n for n, _ in self.routes]}")
        return replace(self, route=name)

    def scoring_queues(self) -> list[tuple[str | None, str]]:
        """(route name or None for the default route, its queue), default first."""
        return [(None, f"{self.prefix}.scoring"), *((n, f"{self.prefix}.scoring.{n}") for n, _ in self.routes)]

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
        """The queue of this view's scoring route (:meth:`for_route`); ``<prefix>.scoring`` by default."""
        return f"{self.prefix}.scoring" if self.route is None else f"{self.prefix}.scoring.{self.route}"

    @property
    def late_exchange(self) -> str:
        """Topic exchange of events that waited past ``scoring.late_after`` (routing key = type)."""
        return f"{self.prefix}.late"

    @property
    def late_queue(self) -> str:
        return f"{self.prefix}.late"

    @property
    def router_exchange(self) -> str:
        return f"{self.prefix}.scoring.router"

    @property
    def default_route_exchange(self) -> str:
        return f"{self.prefix}.scoring.default"

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
        """(name, type) in declaration order: the DLX first; arguments in :meth:`exchange_arguments`."""
        return [
            (self.dead_letter_exchange, "fanout"), (self.events_exchange, "topic"), (self.scored_exchange, "topic"),
            (self.retry_exchange, "direct"), (self.default_route_exchange, "fanout"), (self.router_exchange, "topic"),
            *([(self.late_exchange, "topic")] if self.late else []),
        ]

    def exchange_arguments(self, name: str) -> dict[str, Any]:
        """Declaration arguments of exchange ``name`` (the router's alternate exchange; else none)."""
        return {"alternate-exchange": self.default_route_exchange} if name == self.router_exchange else {}

    def exchange_bindings(self) -> list[tuple[str, str, str]]:
        """(destination, source, pattern) exchange-to-exchange bindings: every event reaches the router."""
        return [(self.router_exchange, self.events_exchange, "#")]

    def obsolete_bindings(self) -> list[tuple[str, str, str]]:
        """(queue, exchange, pattern) bindings of earlier versions that declaring removes (idempotent).

        ``<prefix>.scoring`` bound to ``events`` with ``#`` would hand the default route the events
        of every route too.
        """
        return [(f"{self.prefix}.scoring", self.events_exchange, "#")]

    def queues(self) -> list[QueueSpec]:
        """Every queue, dead-letter queue first, then each scoring queue with its retry levels.

        Every argument is explicit (REL-03).
        """
        dead_args: dict[str, Any] = {"x-queue-type": "quorum", "x-overflow": "reject-publish"}
        specs = [QueueSpec(self.dead_letter_queue, dead_args, ((self.dead_letter_exchange, ""),))]
        patterns = dict(self.routes)
        for name, _queue in self.scoring_queues():
            view = self.for_route(name)
            intake = ((self.default_route_exchange, ""),) if name is None else tuple(
                (self.router_exchange, p) for p in patterns[name]
            )
            specs.append(view._scoring_spec(intake))
            specs.extend(view.retry_queues())
        if self.late:
            specs.append(QueueSpec(
                self.late_queue,
                {"x-queue-type": "quorum", "x-overflow": "reject-publish", "x-dead-letter-exchange":
                 self.dead_letter_exchange, "x-dead-letter-strategy": "at-least-once",
                 "x-delivery-limit": self.delivery_limit},
                ((self.late_exchange, "#"),),
            ))
        specs.extend(self.extra_queues)
        return specs

    def _scoring_spec(self, intake: tuple[tuple[str, str], ...]) -> QueueSpec:
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": self.delivery_limit,
        }
        if self.max_queue_length is not None:
            args["x-max-length"] = self.max_queue_length
        return QueueSpec(self.scoring_queue, args, (*intake, (self.retry_exchange, self.scoring_queue)))

    def retry_queues(self) -> list[QueueSpec]:
        """The retry levels (REL-08) of this view's scoring queue: expired messages go back to it.

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

    def exchange_arguments(self, name: str) -> dict[str, Any]:
        return {}

    def exchange_bindings(self) -> list[tuple[str, str, str]]:
        return []

    def obsolete_bindings(self) -> list[tuple[str, str, str]]:
        return []
