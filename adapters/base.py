"""The adapter plugin API. Third-party adapters build on exactly this module.

An adapter turns a legacy system into **records** with **positions**, and reports a **cursor**
after each batch. The gateway does the rest: mapping records to CloudEvents, deterministic ids,
storing the events and the cursor in one transaction, retries and scheduling.

A minimal polling adapter::

    class DropFolderConfig(SourceConfig):
        path: str = Field(..., description="Folder to read")

    class DropFolderSource(PollingSource[DropFolderConfig]):
        kind = "drop-folder"
        config_model = DropFolderConfig

        def fetch(self, cursor, limit):
            ...
            return Batch(records=[Record(data=row, position={"file": f, "line": n})],
                         cursor={"file": f, "line": n}, has_more=False)

Register it in your ``pyproject.toml``::

    [project.entry-points."gateway.adapters"]
    drop-folder = "my_package:DropFolderSource"

The contract every adapter keeps (the standard test suite in ``adapters.testing`` checks it; docs/plugins.md):

* ``fetch(cursor, limit)`` is a pure function of the source's committed state and ``cursor``:
  calling it twice with the same cursor returns the same records (until the source changes).
* The returned ``cursor`` covers exactly the returned records; the gateway stores it in the same
  transaction as their events, so a crash replays at most the uncommitted batch.
* Errors are translated in one place, :meth:`PollingSource.classify_error`.
"""

from __future__ import annotations

import abc
import hashlib
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import (
    ConfigurationError,
    ContractError,
    GatewayError,
    PermanentError,
    SkippableError,
    TransientError,
)

__all__ = [
    "SourceConfig",
    "Record",
    "Batch",
    "Reject",
    "Fingerprint",
    "PollingSource",
    "ConfigT",
    "ConfigurationError",
    "ContractError",
    "GatewayError",
    "PermanentError",
    "SkippableError",
    "TransientError",
]


class SourceConfig(BaseModel):
    """Base of every adapter's typed configuration (the ``config:`` block of a source).

    Unknown keys are errors. Give every field a ``description``: it is the user's reference.
    Validation errors never echo the input (it may hold secrets).
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    batch_size: int = Field(1000, ge=1, le=100_000, description="Most records fetched per poll.")


ConfigT = TypeVar("ConfigT", bound=SourceConfig)


@dataclass(frozen=True, slots=True)
class Record:
    """One legacy record.

    Attributes:
        data: field name -> value (native Python values; the gateway makes them JSON-safe).
        position: where the record sits in the source, JSON-safe (travels as lineage).
        deleted: whether the record is a deletion (soft-delete column, tombstone).
        lenient: whether it was parsed leniently from a non-conformant response.
    """

    data: Mapping[str, Any]
    position: Any = None
    deleted: bool = False
    lenient: bool = False


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A digest of the source's schema or contract (a WSDL and its XSDs, a table's columns).

    Attributes:
        digest: one hash over all parts; a change means the source's shape changed.
        parts: each part's own hash (document location -> SHA-256), to say *what* changed.
    """

    digest: str
    parts: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_parts(cls, parts: Mapping[str, str]) -> Fingerprint:
        """A fingerprint whose digest is the SHA-256 over the sorted ``name=digest`` lines.

        Args:
            parts: part name -> digest of the part (e.g. ``hashlib.sha256(doc).hexdigest()``).

        Returns:
            The fingerprint; equal parts always give an equal digest.
        """
        text = "".join(f"{name}={parts[name]}\n" for name in sorted(parts))
        return cls(digest=hashlib.sha256(text.encode("utf-8")).hexdigest(), parts=dict(parts))


@dataclass(frozen=True, slots=True)
class Reject:
    """Something the adapter read but cannot turn into a record: it becomes a dead letter.

    The source runner stores it in the same transaction as the batch's events and cursor, so it
    is neither lost nor read again (a message is acked, a cursor moves past the row).

    Attributes:
        payload: the raw input (bytes are kept as text when UTF-8, else base64).
        error_class: what went wrong, e.g. ``DecodeError`` (shown and filterable in dead letters).
        reason: the message: what, where, what was expected.
        headers: metadata worth keeping (message headers, column names).
        position: where it sat in the source (lineage), JSON-safe.
        attempts: deliveries or reads so far.
    """

    payload: bytes | str | None
    error_class: str
    reason: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    position: Any = None
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class Batch:
    """What one ``fetch`` returns.

    Attributes:
        records: the records, in source order.
        cursor: the JSON-safe cursor after these records; stored with their events.
        has_more: ``True`` if the source has more records right now (poll again at once).
        meta: adapter facts about the read (shown by ``gateway sources test``).
        rejects: inputs that cannot become records; stored as dead letters with the batch.
        token: the adapter's own handle on the batch (e.g. the deliveries to ack), given back to
            :meth:`PollingSource.committed` or :meth:`PollingSource.released`; never stored.
    """

    records: Sequence[Record]
    cursor: Any
    has_more: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)
    rejects: Sequence[Reject] = ()
    token: Any = None


class PollingSource(abc.ABC, Generic[ConfigT]):
    """Base class of polling adapters.

    Override :meth:`fetch` (required); override :meth:`open`, :meth:`close`, :meth:`check`,
    :meth:`initial_cursor`, :meth:`count_between` and :meth:`classify_error` when the defaults do
    not fit, and :meth:`breaker_key`, :meth:`fingerprint`, :attr:`drift_check_interval` and
    :attr:`stop_on_drift` to share a circuit breaker or to have schema drift detected.

    Args:
        config: the validated ``config:`` block.
        source_name: the configured source name (for messages and lineage).
    """

    #: Adapter kind, shown in lineage (``sourceadapter``) and ``gateway sources list``.
    kind: ClassVar[str] = "polling"
    #: True when reading is not free of side effects for the source: a queue consumer must take
    #: messages and hand them back, which a quorum queue counts as a delivery. ``gateway sources
    #: test`` then refuses to run without ``--allow-redelivery``. Polling sources keep the default.
    dry_run_redelivers: ClassVar[bool] = False
    #: The pydantic model of this adapter's ``config:`` block.
    config_model: ClassVar[type[SourceConfig]] = SourceConfig

    def __init__(self, config: ConfigT, *, source_name: str) -> None:
        self.config = config
        self.source_name = source_name

    @classmethod
    def parse_config(cls, raw: Mapping[str, Any]) -> SourceConfig:
        """Validate a raw ``config:`` block (raises pydantic ``ValidationError``)."""
        return cls.config_model.model_validate(dict(raw))

    def open(self) -> None:
        """Connect and validate the configuration against the live source.

        Override when the adapter holds connections, or can check names against the source's
        metadata. Raise :class:`ConfigurationError` for configuration that cannot work.
        """

    def close(self) -> None:
        """Release connections. Override when :meth:`open` acquired any. Must be idempotent."""

    def check(self) -> None:
        """Connectivity check for ``gateway check --connect``.

        The default opens the adapter; override for a cheaper probe.
        """
        self.open()

    def initial_cursor(self) -> Any:
        """The cursor of a source that never ran. Override to start elsewhere than the beginning."""
        return None

    @abc.abstractmethod
    def fetch(self, cursor: Any, limit: int) -> Batch:
        """Read up to ``limit`` records after ``cursor``.

        Args:
            cursor: the committed cursor (``initial_cursor()`` on the first poll).
            limit: the most records to return.

        Returns:
            The records and the cursor after them.

        Raises:
            Exception: anything; :meth:`classify_error` decides retry, dead letter or stop.
        """

    def committed(self, batch: Batch) -> None:
        """Called after ``batch``'s events, dead letters and cursor were committed to the outbox.

        Override to acknowledge what the batch read (a queue adapter acks its deliveries here:
        never earlier, so a crash before the commit redelivers them). The default does nothing.
        """

    def released(self, batch: Batch) -> None:
        """Called when ``batch`` could not be committed (the store failed past its retries).

        Override to give back what the batch holds (a queue adapter requeues its deliveries).
        The next ``fetch`` starts from the committed cursor again. The default does nothing.
        """

    def count_between(self, after: Any, upto: Any) -> int | None:
        """Rows after cursor `after` up to and including cursor `upto` (None = the source's end); None when the adapter cannot tell.

        ``gateway sources cursor NAME --set/--reset`` uses it to preview how many rows moving
        the cursor would read again (``count_between(new, current)``) or skip
        (``count_between(current, new)``). Both cursors are ones :meth:`fetch` takes: ``after``
        may be ``None`` (the beginning, as ``fetch(None, ...)`` reads it). Return 0 when
        ``upto`` is not after ``after``. Called after :meth:`open`. Override when the source can
        count cheaply (a SQL ``COUNT(*)`` over the cursor range); the default cannot tell.

        Args:
            after: the cursor the range starts after.
            upto: the cursor the range ends at (inclusive), or ``None`` for the source's end.

        Returns:
            The number of rows, or ``None`` (the default: unknown).
        """
        return None

    def classify_error(self, exc: BaseException) -> GatewayError:
        """Translate a native error into the gateway taxonomy.

        The default: gateway errors pass through; ``TimeoutError``, ``ConnectionError`` and other
        ``OSError`` are transient; everything else is permanent. Override to recognise your
        client library's errors (for example zeep ``Fault`` or DBAPI ``OperationalError``).
        """
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, (TimeoutError, ConnectionError, socket.timeout, OSError)):
            err: GatewayError = TransientError(f"{type(exc).__name__}: {exc}")
        else:
            err = PermanentError(f"{type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    def breaker_key(self) -> str:
        """Name of the circuit breaker guarding this source's :meth:`fetch`.

        The default, ``source:<source name>``, gives every source its own breaker. Override when
        several sources share one downstream endpoint (operations of one SOAP service, tables of
        one database): adapters that return the same key share one breaker, so an outage seen by
        one of them pauses all of them. Called once, after :meth:`open`, so the key may depend on
        what ``open`` resolved (for example the endpoint address from a WSDL).

        Returns:
            The breaker name, e.g. ``"soap:https://erp.example/orders"``.
        """
        return f"source:{self.source_name}"

    def fingerprint(self) -> Fingerprint | None:
        """A digest of the source's current schema, for drift detection; ``None`` to opt out.

        The runner calls it after :meth:`open` and then every :attr:`drift_check_interval`
        seconds. The first fingerprint becomes the stored baseline; a later digest that differs
        is reported as drift (``gateway sources list``, ``/readyz``, one log warning naming the
        changed parts) until an operator runs ``gateway sources accept-drift``. An exception is
        logged as a warning and polling continues. Override when the source has a schema
        document worth watching (WSDL/XSD, table definitions); :meth:`Fingerprint.from_parts`
        builds the digest from per-part digests.

        Returns:
            The current fingerprint, or ``None`` (the default: no drift detection).
        """
        return None

    @property
    def drift_check_interval(self) -> float | None:
        """Seconds between :meth:`fingerprint` checks while running; ``None`` checks only at start.

        Override (for example from the adapter's config) to watch a long-running source.
        """
        return None

    @property
    def stop_on_drift(self) -> bool:
        """Whether a detected drift stops polling (state ``drift-stopped``) until accepted or resumed.

        The default, ``False``, only reports drift. Override to return ``True`` (for example from
        the adapter's config) when reading with a stale schema could misread records.
        """
        return False
