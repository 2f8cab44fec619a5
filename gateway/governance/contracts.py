"""JSON-Schema contracts per event type, with the modes evolve, freeze and discard (issue 8).

:class:`ContractEnforcer` checks a batch right before the store accepts it:

* the **first contract** whose type patterns match an event's type applies (order matters: put
  specific patterns before ``#``); events of other types pass unchecked and untracked;
* state is kept per (event type, CloudEvents ``source``) -- one producer's shape -- starting from the
  configured schema or, without one, inferred from the first batch of that type and source;
* **evolve**: additive, compatible changes (see :mod:`gateway.governance.schemas`) widen the stored
  schema, other violations are rejected (dead letter);
* **freeze**: a violating event is rejected (dead letter naming the field and what was expected),
  the rest of the batch is accepted; conforming shapes that are new (an optional field seen for the
  first time) are still tracked;
* **discard**: a violating event is dropped, counted and logged (field and expectation, never the
  value), with no dead letter: see docs/governance.md for why;
* every change of a (type, source) state -- creation, evolution, a newly seen conforming shape, a
  configuration change -- is one new version and one **schema-change event**, at most one per
  (type, source) per batch, with a deterministic id (a retried batch never makes a second one).

The new states and their schema-change events are written together by
:meth:`~gateway.store.contracts.ContractRepository.save_contract_updates` *before* the batch is
accepted (the change precedes the events that show it; a crash in between leaves a schema wider
than needed, never an event without its schema).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.events.ids import uuid5
from gateway.events.jsonsafe import dumps
from gateway.events.model import EXT_ADAPTER, EXT_SOURCE_NAME, EXT_TRACEPARENT, Event
from gateway.events.topics import topic_matches
from gateway.governance.schemas import (
    Incompatible,
    Violation,
    evolve,
    fingerprint,
    infer_many,
    violations,
)
from gateway.store.contracts import ContractState, ContractUpdate

__all__ = [
    "CONTRACT_STAGE",
    "MODES",
    "SCHEMA_CHANGE_ADAPTER",
    "Contract",
    "ContractEnforcer",
    "ContractOutcome",
    "ContractStore",
]

log = logging.getLogger("gateway.governance")

MODES = ("evolve", "freeze", "discard")
#: Dead-letter stage of events a contract rejected (replayable: the payload is the CloudEvent).
CONTRACT_STAGE = "contract"
#: ``sourceadapter`` of schema-change events.
SCHEMA_CHANGE_ADAPTER = "governance"
_ERROR_CLASS = "ContractViolation"


class ContractStore(Protocol):
    """What the enforcer needs from the store (:class:`~gateway.store.contracts.ContractRepository`)."""

    def load_contract_states(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], ContractState]: ...


@dataclass(frozen=True, slots=True)
class Contract:
    """One configured contract.

    Attributes:
        types: AMQP topic patterns over event types.
        mode: ``evolve``, ``freeze`` or ``discard``.
        schema: the configured JSON Schema of ``data``, or ``None`` to infer it from the first events.
        infer_required: inferred schemas make the fields of the first events required.
    """

    types: tuple[str, ...]
    mode: str = "evolve"
    schema: Any = None
    infer_required: bool = True

    @property
    def base_fingerprint(self) -> str | None:
        """Fingerprint of the configured schema (``None``: inferred)."""
        return None if self.schema is None else fingerprint(self.schema)

    def matches(self, event_type: str) -> bool:
        """Whether one of the patterns matches ``event_type``."""
        return any(topic_matches(p, event_type) for p in self.types)


@dataclass
class ContractOutcome:
    """What :meth:`ContractEnforcer.check` decided for a batch.

    Attributes:
        accepted: the events to accept, in batch order.
        rejects: dead-letter rows (keys of ``EventStore.add_dead_letter`` plus ``dedupe_key``) of
            rejected events; pass them to ``accept(..., rejects=...)``.
        extra_events: schema-change events (already in ``save_contract_updates``' hands: write
            them with :attr:`updates`, not with ``accept``).
        updates: new contract states to store before accepting (``store.save_contract_updates``).
        discarded: dropped events by ``(event type, reason)``.
        rejected_ids: ids of rejected events, with their violations (for an API's 422).
    """

    accepted: list[Event] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    extra_events: list[Event] = field(default_factory=list)
    updates: list[ContractUpdate] = field(default_factory=list)
    discarded: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejected_ids: dict[str, list[Violation]] = field(default_factory=dict)


@dataclass
class _Work:
    """One (type, source) key during a check."""

    contract: Contract
    stored: ContractState | None
    state: ContractState | None
    changes: list[str] = field(default_factory=list)
    trigger: Event | None = None


class ContractEnforcer:
    """Checks batches against the configured contracts.

    Args:
        contracts: in order; the first whose patterns match a type applies.
        store: reads the stored states (one query per batch).
        schema_change_type: type of schema-change events; ``{type}`` is the changed event type.
    """

    def __init__(
        self, contracts: Sequence[Contract], store: ContractStore, *, schema_change_type: str = "{type}.schema-changed"
    ) -> None:
        for i, c in enumerate(contracts):
            if c.mode not in MODES:
                raise ValueError(f"contracts[{i}].mode: expected one of {', '.join(MODES)}, got {c.mode!r}")
        self.contracts = tuple(contracts)
        self.store = store
        self.schema_change_type = schema_change_type
        self._by_type: dict[str, Contract | None] = {}

    def contract_for(self, event_type: str) -> Contract | None:
        """The contract applying to ``event_type`` (first match), cached per type."""
        try:
            return self._by_type[event_type]
        except KeyError:
            found = next((c for c in self.contracts if c.matches(event_type)), None)
            if len(self._by_type) > 10_000:
                self._by_type.clear()
            self._by_type[event_type] = found
            return found

    def check(self, events: Sequence[Event], source_name: str | None = None) -> ContractOutcome:
        """Decide, per event, accept / reject / discard; compute state changes and change events.

        Pure apart from one read of the stored states: nothing is written. Store
        ``outcome.updates`` with ``outcome.extra_events`` (``save_contract_updates``), then accept
        ``outcome.accepted`` with ``outcome.rejects``.

        Args:
            events: the batch, after PII policies.
            source_name: the gateway source of the batch (lineage of rejects and change events).
        """
        out = ContractOutcome()
        if not self.contracts or not events:
            out.accepted = list(events)
            return out
        contracted = [(ev, c) for ev in events if (c := self.contract_for(ev.type)) is not None]
        if not contracted:
            out.accepted = list(events)
            return out
        keys = list(dict.fromkeys((ev.type, ev.source) for ev, _ in contracted))
        stored = self.store.load_contract_states(keys)
        work: dict[tuple[str, str], _Work] = {}
        for ev in events:
            contract = self.contract_for(ev.type)
            if contract is None:
                out.accepted.append(ev)
                continue
            key = (ev.type, ev.source)
            w = work.get(key)
            if w is None:
                w = work[key] = self._start(key, contract, stored.get(key), events, source_name or ev.source_name)
                if w.changes:
                    w.trigger = ev
            self._one(w, ev, out, source_name)
        for w in work.values():
            self._finish(w, out)
        if out.discarded:
            for (etype, reason), n in out.discarded.items():
                log.warning("contract: discarded %d event(s) of type %r from source %r: %s", n, etype, source_name, reason)
        return out

    # ------------------------------------------------------------------ per key
    def _start(
        self, key: tuple[str, str], contract: Contract, stored: ContractState | None, batch: Sequence[Event],
        source_name: str | None,
    ) -> _Work:
        base_fp = contract.base_fingerprint
        w = _Work(contract, stored, stored)
        if stored is not None and stored.mode == contract.mode and stored.base_fingerprint == base_fp:
            return w
        if stored is not None and stored.base_fingerprint == base_fp:
            # Mode changed: freezing keeps what was learned (the current schema becomes the contract).
            enforced = None if contract.mode == "evolve" else (contract.schema if contract.schema is not None
                                                                else stored.schema)
            w.state = _replace(stored, mode=contract.mode, enforced=enforced, source_name=source_name)
            w.changes.append(f"mode {stored.mode} -> {contract.mode}")
            return w
        if contract.schema is not None:
            schema = contract.schema
            why = "created from the configured schema" if stored is None else "the configured schema changed"
        else:
            # The first events of this type and source define the schema (all of this batch's).
            schema = infer_many(
                [e.data for e in batch if (e.type, e.source) == key], required=contract.infer_required
            )
            why = "inferred from the first events"
        enforced = None if contract.mode == "evolve" else schema
        w.state = ContractState(
            event_type=key[0], source=key[1], source_name=source_name, mode=contract.mode,
            version=(stored.version if stored else 0), schema=schema, enforced=enforced,
            base_fingerprint=base_fp, fingerprint=fingerprint(schema),
        )
        w.changes.append(why)
        return w

    def _one(self, w: _Work, ev: Event, out: ContractOutcome, source_name: str | None) -> None:
        st = w.state
        assert st is not None
        if st.mode == "evolve":
            try:
                schema, changes = evolve(st.schema, ev.data)
            except Incompatible as exc:
                self._refuse(w, ev, [Violation(exc.path, exc.expected, exc.got)], out, source_name)
                return
            bad = violations(schema, ev.data)
            if bad:  # a keyword evolution does not widen (pattern, enum, format...)
                self._refuse(w, ev, bad, out, source_name)
                return
            if changes:
                w.state = _replace(st, schema=schema, fingerprint=fingerprint(schema), source_name=source_name)
                w.changes.extend(changes)
                w.trigger = w.trigger or ev
            out.accepted.append(ev)
            return
        bad = violations(st.enforced, ev.data)
        if bad:
            self._refuse(w, ev, bad, out, source_name)
            return
        try:  # conforming, maybe a shape not seen yet (an optional field): track it
            schema, changes = evolve(st.schema, ev.data)
        except Incompatible:
            schema, changes = st.schema, []
        if changes:
            w.state = _replace(st, schema=schema, fingerprint=fingerprint(schema), source_name=source_name)
            w.changes.extend(changes)
            w.trigger = w.trigger or ev
        out.accepted.append(ev)

    def _refuse(self, w: _Work, ev: Event, bad: list[Violation], out: ContractOutcome, source_name: str | None) -> None:
        st = w.state
        assert st is not None
        shown = "; ".join(str(v) for v in bad)
        if st.mode == "discard":
            out.discarded[(ev.type, str(bad[0]))] += 1
            return
        version = (w.stored.version if w.stored else 0) + (1 if w.changes else 0)
        reason = (f"event {ev.id} of type {ev.type!r} from {ev.source!r} violates its contract "
                  f"({st.mode}, schema version {version}): {shown}")
        out.rejected_ids[ev.id] = bad
        identity = dumps(["contract", ev.id, st.fingerprint if st.enforced is None else fingerprint(st.enforced)])
        out.rejects.append({
            "stage": CONTRACT_STAGE,
            "event_id": ev.id,
            "source_name": source_name or ev.source_name,
            "error_class": _ERROR_CLASS,
            "reason": reason,
            "payload": ev.to_json().decode("utf-8"),
            "headers": {
                "event_type": ev.type, "mode": st.mode, "schema_version": version,
                "violations": [{"path": v.path, "expected": v.expected, "got": v.got} for v in bad],
            },
            "dedupe_key": hashlib.sha256(identity).hexdigest(),
        })

    def _finish(self, w: _Work, out: ContractOutcome) -> None:
        if not w.changes or w.state is None:
            return
        old = w.stored
        new = _replace(w.state, version=(old.version if old else 0) + 1)
        out.updates.append(ContractUpdate(new, None if old is None else old.version))
        out.extra_events.append(self._change_event(old, new, w.changes, w.trigger))

    def _change_event(self, old: ContractState | None, new: ContractState, changes: list[str], trigger: Event | None) -> Event:
        ext: dict[str, str | int | bool] = {EXT_ADAPTER: SCHEMA_CHANGE_ADAPTER}
        if new.source_name:
            ext[EXT_SOURCE_NAME] = new.source_name
        if trigger is not None and EXT_TRACEPARENT in trigger.extensions:
            ext[EXT_TRACEPARENT] = trigger.extensions[EXT_TRACEPARENT]
        from gateway.events import utcnow

        return Event(
            id=uuid5(f"schema-change|{new.event_type}|{new.source}|{new.version}|{new.fingerprint}"),
            source=new.source,
            type=self.schema_change_type.format(type=new.event_type),
            time=trigger.time if trigger is not None else utcnow(),
            subject=new.event_type,
            data={
                "eventtype": new.event_type,
                "source": new.source,
                "sourcename": new.source_name,
                "mode": new.mode,
                "version": new.version,
                "previousversion": old.version if old else None,
                "schema": new.schema,
                "previousschema": old.schema if old else None,
                "fingerprint": new.fingerprint,
                "previousfingerprint": old.fingerprint if old else None,
                "enforced": new.enforced,
                "changes": list(dict.fromkeys(changes)),
                "triggeringevent": trigger.id if trigger is not None else None,
            },
            extensions=ext,
        )


def _replace(st: ContractState, **kw: Any) -> ContractState:
    import dataclasses

    return dataclasses.replace(st, **kw)
