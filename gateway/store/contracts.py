"""Contract state per (event type, CloudEvents source): the schema, its version, the frozen contract.

Written by :class:`gateway.governance.ContractEnforcer` through :meth:`ContractRepository.save_contract_updates`,
which stores the new states **and** their schema-change events in one transaction, conditional on
the version each update was computed from (compare-and-set): two writers evolving the same schema
at once cannot both win; the loser gets :class:`ContractConflictError` (transient) and checks its
batch again against the winner's schema.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, or_, select, update

from gateway.errors import TransientError
from gateway.events.model import Event
from gateway.store._sql import guard, insert_ignore
from gateway.store.schema import contract_schemas

__all__ = ["ContractConflictError", "ContractRepository", "ContractState", "ContractUpdate"]


class ContractConflictError(TransientError):
    """Another writer changed a contract state since it was read; check the batch again."""


@dataclass(frozen=True, slots=True)
class ContractState:
    """The stored state of one (event type, source) under a contract.

    Attributes:
        event_type: the CloudEvents type.
        source: the CloudEvents ``source`` attribute (one producer: a gateway source, a REST client).
        source_name: the gateway source (lineage) that last changed it.
        mode: ``evolve``, ``freeze`` or ``discard``.
        version: 1 at creation, +1 at every change.
        schema: the current shape (evolve: the contract itself).
        enforced: freeze/discard: the contract events must satisfy; ``None`` in evolve mode.
        base_fingerprint: fingerprint of the configured schema it started from (``None``: inferred).
        fingerprint: fingerprint of ``schema``.
        updated_at: when it was written (store clock); ``None`` before it is stored.
    """

    event_type: str
    source: str
    source_name: str | None
    mode: str
    version: int
    schema: Any
    enforced: Any
    base_fingerprint: str | None
    fingerprint: str
    updated_at: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        """``(event_type, source)``."""
        return (self.event_type, self.source)


@dataclass(frozen=True, slots=True)
class ContractUpdate:
    """A new state to store if the stored one still has ``expected_version`` (``None``: absent)."""

    state: ContractState
    expected_version: int | None


def _state(row: Any) -> ContractState:
    return ContractState(
        event_type=row.event_type, source=row.source, source_name=row.source_name, mode=row.mode,
        version=int(row.version), schema=json.loads(row.schema_json),
        enforced=json.loads(row.enforced_json) if row.enforced_json is not None else None,
        base_fingerprint=row.base_fingerprint, fingerprint=row.fingerprint, updated_at=row.updated_at,
    )


class ContractRepository:
    """Contract state methods of :class:`~gateway.store.EventStore` (mixed in)."""

    engine: Engine
    _clock: Callable[[], datetime]
    _insert_events: Callable[[Connection, list[dict[str, Any]]], list[str]]

    def load_contract_states(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], ContractState]:
        """The stored states of ``keys`` (``(event_type, source)`` pairs); absent keys are left out."""
        keys = list(dict.fromkeys(keys))
        out: dict[tuple[str, str], ContractState] = {}
        c = contract_schemas.c
        with guard("load_contract_states"), self.engine.connect() as conn:
            for i in range(0, len(keys), 200):
                chunk = keys[i : i + 200]
                cond = or_(*(and_(c.event_type == t, c.source == s) for t, s in chunk))
                for row in conn.execute(select(contract_schemas).where(cond)):
                    st = _state(row)
                    out[st.key] = st
        return out

    def list_contract_states(self, event_type: str | None = None) -> list[ContractState]:
        """Every stored state (optionally of one type), by type and source."""
        c = contract_schemas.c
        query = select(contract_schemas).order_by(c.event_type, c.source)
        if event_type is not None:
            query = query.where(c.event_type == event_type)
        with guard("list_contract_states"), self.engine.connect() as conn:
            return [_state(r) for r in conn.execute(query)]

    def save_contract_updates(self, updates: Sequence[ContractUpdate], events: Sequence[Event] = ()) -> None:
        """Store new contract states and their schema-change events, in one transaction.

        Args:
            updates: each written only if the stored version is still ``expected_version``.
            events: schema-change events, accepted into the outbox (idempotent on their ids).

        Raises:
            ContractConflictError: a state changed meanwhile; nothing was written.
            StoreUnavailableError: the transaction did not commit; nothing was written.
        """
        if not updates and not events:
            return
        from gateway.store.repository import (
            _outbox_rows,  # the outbox row format has one owner
        )

        now = self._clock()
        c = contract_schemas.c
        with guard("save_contract_updates"), self.engine.begin() as conn:
            for up in updates:
                st = up.state
                values = {
                    "source_name": st.source_name, "mode": st.mode, "version": st.version,
                    "schema_json": json.dumps(st.schema, sort_keys=True, separators=(",", ":")),
                    "enforced_json": None if st.enforced is None
                    else json.dumps(st.enforced, sort_keys=True, separators=(",", ":")),
                    "base_fingerprint": st.base_fingerprint, "fingerprint": st.fingerprint, "updated_at": now,
                }
                if up.expected_version is None:
                    ins = insert_ignore(conn, contract_schemas, ["event_type", "source"])
                    done = conn.execute(ins, {"event_type": st.event_type, "source": st.source, **values}).rowcount
                else:
                    done = conn.execute(
                        update(contract_schemas)
                        .where(c.event_type == st.event_type, c.source == st.source,
                               c.version == up.expected_version)
                        .values(**values)
                    ).rowcount
                if not done:
                    raise ContractConflictError(
                        f"contract state of {st.event_type!r} from {st.source!r} changed meanwhile "
                        f"(expected version {up.expected_version}); check the batch again"
                    )
            if events:
                rows = _outbox_rows(events, None, now)
                self._insert_events(conn, list(rows.values()))
