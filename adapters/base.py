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

The contract every adapter keeps (a standard test suite for it is planned in ``adapters.testing``):

* ``fetch(cursor, limit)`` is a pure function of the source's committed state and ``cursor``:
  calling it twice with the same cursor returns the same records (until the source changes).
* The returned ``cursor`` covers exactly the returned records; the gateway stores it in the same
  transaction as their events, so a crash replays at most the uncommitted batch.
* Errors are translated in one place, :meth:`PollingSource.classify_error`.
"""

from __future__ import annotations

import abc
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
    """

    model_config = ConfigDict(extra="forbid")

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
class Batch:
    """What one ``fetch`` returns.

    Attributes:
        records: the records, in source order.
        cursor: the JSON-safe cursor after these records; stored with their events.
        has_more: ``True`` if the source has more records right now (poll again at once).
    """

    records: Sequence[Record]
    cursor: Any
    has_more: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)


class PollingSource(abc.ABC, Generic[ConfigT]):
    """Base class of polling adapters.

    Override :meth:`fetch` (required); override :meth:`open`, :meth:`close`, :meth:`check`,
    :meth:`initial_cursor` and :meth:`classify_error` when the defaults do not fit.

    Args:
        config: the validated ``config:`` block.
        source_name: the configured source name (for messages and lineage).
    """

    #: Adapter kind, shown in lineage (``sourceadapter``) and ``gateway sources list``.
    kind: ClassVar[str] = "polling"
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
