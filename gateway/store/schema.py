"""Tables of the gateway store (SQLAlchemy Core). Alembic revisions in ``migrations/`` create them."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

from gateway.store.types import UTCDateTime

__all__ = [
    "api_keys",
    "audit_log",
    "local_secrets",
    "DESIRED_PAUSED",
    "DESIRED_RUNNING",
    "EVENT_PENDING",
    "EVENT_PUBLISHED",
    "contract_schemas",
    "dead_letters",
    "events",
    "metadata",
    "model_checkpoints",
    "scores",
    "scoring_attempts",
    "source_cursors",
    "source_run_requests",
    "source_runners",
    "source_status",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; BigInteger elsewhere.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")

EVENT_PENDING = "pending"
EVENT_PUBLISHED = "published"

#: Operator wishes for a source (``source_status.desired_state``).
DESIRED_RUNNING = "running"
DESIRED_PAUSED = "paused"

#: Events, which are also the outbox: ``status`` moves pending -> published on the broker's ack.
events = Table(
    "events",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True, comment="Acceptance order; pagination key"),
    Column("id", String(64), nullable=False, comment="CloudEvents id (deterministic UUIDv5)"),
    Column("source_name", String(128), nullable=False, comment="Gateway source (lineage)"),
    Column("type", String(255), nullable=False),
    Column("subject", String(512), nullable=True),
    Column("time", UTCDateTime(), nullable=False, comment="Event time (UTC)"),
    Column("envelope", Text, nullable=False, comment="The whole structured-mode CloudEvent JSON"),
    Column("status", String(16), nullable=False, default=EVENT_PENDING),
    Column("attempts", Integer, nullable=False, default=0, comment="Failed publish attempts"),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", UTCDateTime(), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("accepted_at", UTCDateTime(), nullable=False),
    Column("published_at", UTCDateTime(), nullable=True),
    UniqueConstraint("id"),
    Index(None, "status", "seq"),
    Index(None, "source_name", "seq"),
    Index(None, "type", "seq"),
)

#: One cursor per source, written in the same transaction as the source's events, and the
#: source's lease: the runner named ``lease_owner`` polls it until ``lease_until`` (renewed while
#: it lives). Taking the lease over bumps ``epoch``; every cursor write is conditional on it.
source_cursors = Table(
    "source_cursors",
    metadata,
    Column("source_name", String(128), primary_key=True),
    Column("cursor", JSON, nullable=True),
    Column("epoch", BigInteger, nullable=False, default=0, comment="Fencing epoch of the writer"),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("events_total", BigInteger, nullable=False, default=0),
    Column("lease_owner", String(255), nullable=True, comment="hostname:pid:runner-id of the lease holder"),
    Column("lease_until", UTCDateTime(), nullable=True, comment="Lease expiry (UTC, gateway clock)"),
)

#: What each source's runner last reported, plus the operator's wishes and the drift baseline.
#: The runner writes the runtime columns; ``desired_*`` belong to operator commands and
#: ``fingerprint*`` to the drift baseline, and a runner's status write never touches them.
source_status = Table(
    "source_status",
    metadata,
    Column("source_name", String(128), primary_key=True),
    Column("state", String(32), nullable=False, comment="Runner state (idle, polling, paused, failed...)"),
    Column("owner", String(255), nullable=True, comment="hostname:pid:runner-id of the reporting runner"),
    Column("epoch", BigInteger, nullable=True, comment="Fencing epoch of the reporting runner"),
    Column("last_poll_at", UTCDateTime(), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("polls", BigInteger, nullable=False, default=0, comment="Since the reporting runner started"),
    Column("events_accepted", BigInteger, nullable=False, default=0),
    Column("duplicates", BigInteger, nullable=False, default=0),
    Column("rejected", BigInteger, nullable=False, default=0),
    Column("breaker", JSON, nullable=True, comment="Circuit breaker snapshot"),
    Column("fingerprint", String(255), nullable=True, comment="Baseline digest of the source's schema"),
    Column("fingerprint_parts", JSON, nullable=True, comment="Baseline: part name -> digest"),
    Column("fingerprint_at", UTCDateTime(), nullable=True),
    Column("drift", JSON, nullable=True, comment="Current schema drift against the baseline, or null"),
    Column("desired_state", String(16), nullable=False, default=DESIRED_RUNNING, server_default=DESIRED_RUNNING),
    Column("desired_generation", BigInteger, nullable=False, default=0, server_default="0",
           comment="Bumped by every operator command; a failed source resumes on a newer one"),
    Column("desired_at", UTCDateTime(), nullable=True, comment="Time of the last operator command"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

#: The operators' "run now" wishes (``gateway sources run``, ``POST /v1/sources/{name}/run``): one
#: row per source, rewritten by every request. A runner that reads a ``requested_at`` it has not
#: seen before ends its wait between polls and polls at once. A table of its own (not a
#: ``source_status`` column), so the status reads of every earlier revision stay as they were.
source_run_requests = Table(
    "source_run_requests",
    metadata,
    Column("source_name", String(128), primary_key=True),
    Column("requested_at", UTCDateTime(), nullable=False, comment="Time of the last run-now request"),
    Column("requested_by", String(255), nullable=True, comment="Who asked: API key name or cli:<os user>"),
)

#: One row per live source runner (holder or standby): its heartbeat, for `gateway sources list`.
#: A runner removes its row when it stops; rows of crashed runners stop being refreshed.
source_runners = Table(
    "source_runners",
    metadata,
    Column("source_name", String(128), primary_key=True),
    Column("owner", String(255), primary_key=True, comment="hostname:pid:runner-id"),
    Column("state", String(32), nullable=False, comment="The runner's state (standby, idle, polling...)"),
    Column("epoch", BigInteger, nullable=True, comment="Fencing epoch it holds; null while standby"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

#: Scores, idempotent per (event, model, version).
scores = Table(
    "scores",
    metadata,
    Column("event_id", String(64), nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("score", Float, nullable=False),
    Column("explanation", JSON, nullable=True),
    Column("event_type", String(255), nullable=False),
    Column("source_name", String(128), nullable=False),
    Column("event_time", UTCDateTime(), nullable=False),
    Column("scored_at", UTCDateTime(), nullable=False),
    UniqueConstraint("event_id", "model_name", "model_version"),
    Index(None, "score"),
)

#: Scoring attempts started for redelivered events and not finished: the gateway's crash-loop
#: counter (``gateway.store.attempts``). Rows live only while an event is being scored again.
scoring_attempts = Table(
    "scoring_attempts",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("attempts", Integer, nullable=False, comment="Started attempts that did not finish"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

#: Checkpoints of stateful models' learned state (``gateway.store.checkpoints``): one row per model
#: version and writing scorer process; a restarting process loads the most-informed row.
#: ``state`` can be several MB (a model that learned many categorical values): LONGTEXT on
#: MariaDB/MySQL, whose TEXT stops at 64 KB.
model_checkpoints = Table(
    "model_checkpoints",
    metadata,
    Column("model_name", String(128), primary_key=True),
    Column("model_version", String(64), primary_key=True),
    Column("instance", String(128), primary_key=True, comment="The writing scorer process (hostname-pid-id)"),
    Column("state", Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=False,
           comment="The model's state_dict() as JSON"),
    Column("events_seen", BigInteger, nullable=False, comment="Events the state has learned from"),
    Column("saved_at", UTCDateTime(), nullable=False),
)

#: Poison messages and records parked for inspection and replay (``gateway.deadletters``). A row
#: is *open* until a replay succeeds (``replayed_at`` set); ``dedupe_key`` identifies one broker
#: dead-letter-queue message, so its redelivery never makes a second row.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", _SEQ, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=True),
    Column("stage", String(32), nullable=False, comment="source | scoring | bridge | broker | relay | ingest"),
    Column("source_name", String(128), nullable=True),
    Column("error_class", String(255), nullable=False),
    Column("reason", Text, nullable=False),
    Column("payload", Text, nullable=True),
    Column("headers", JSON, nullable=True),
    Column("attempts", Integer, nullable=False, default=1),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("replayed_at", UTCDateTime(), nullable=True, comment="Last successful replay; null while open"),
    Column("replay_count", Integer, nullable=False, server_default="0", comment="Replay attempts"),
    Column("last_replay_at", UTCDateTime(), nullable=True, comment="Time of the last replay attempt"),
    Column("last_replay_outcome", String(16), nullable=True, comment="requeued | accepted | failed"),
    Column("last_replay_detail", Text, nullable=True, comment="Event ids replayed, or why the replay failed"),
    Column("dedupe_key", String(64), nullable=True, comment="Identity of a broker DLQ message (SHA-256)"),
    UniqueConstraint("dedupe_key"),
    Index(None, "stage", "id"),
    Index(None, "event_id"),
)

#: API keys (``gateway.store.keys``): only an HMAC-SHA256 digest of each token is stored, keyed by
#: the server secret ``api.key_secret``. ``sources`` null means every source.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True, comment="Public key id (part of the token)"),
    Column("name", String(128), nullable=False),
    Column("digest", String(64), nullable=False, comment="HMAC-SHA256 of the token (hex)"),
    Column("scopes", JSON, nullable=False, comment="List of scopes"),
    Column("sources", JSON, nullable=True, comment="Allowed gateway sources; null: all"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True, comment="Updated at most once a minute per process"),
)

#: Admin actions (``gateway.store.audit``): key changes, dead-letter replays and deletes, cursor moves.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", _SEQ, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("actor_id", String(32), nullable=True, comment="API key id; null for the CLI or auth off"),
    Column("actor_name", String(255), nullable=False, comment="Key name, or cli:<os user>"),
    Column("action", String(64), nullable=False),
    Column("target", String(255), nullable=True),
    Column("details", JSON, nullable=True),
    Index(None, "action", "id"),
)

#: Secrets the store generates for itself: the dev/test API key secret when ``api.key_secret`` is unset.
local_secrets = Table(
    "local_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(128), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

#: Contract state per (event type, CloudEvents source) (``gateway.store.contracts``): the current
#: schema (the shape seen; in evolve mode the contract itself), its version, and in freeze/discard
#: mode the enforced contract. Schemas are JSON text; LONGTEXT on MariaDB (TEXT stops at 64 KB).
contract_schemas = Table(
    "contract_schemas",
    metadata,
    Column("event_type", String(255), primary_key=True),
    Column("source", String(255), primary_key=True, comment="CloudEvents source attribute (the producer)"),
    Column("source_name", String(128), nullable=True, comment="Gateway source that last changed it"),
    Column("mode", String(16), nullable=False, comment="evolve | freeze | discard"),
    Column("version", Integer, nullable=False, comment="1 at creation, +1 per change"),
    Column("schema_json", Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=False,
           comment="Current schema (JSON Schema as JSON)"),
    Column("enforced_json", Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=True,
           comment="freeze/discard: the enforced contract; null in evolve mode"),
    Column("base_fingerprint", String(64), nullable=True, comment="SHA-256 of the configured schema, if any"),
    Column("fingerprint", String(64), nullable=False, comment="SHA-256 of schema_json (canonical)"),
    Column("updated_at", UTCDateTime(), nullable=False),
)
