"""The governance step at the acceptance point: PII policies, then contracts, then the store.

:class:`Governance` is what the source runner and the API ingest call instead of a bare
``store.accept``. Order, and why:

1. **PII policies** first: the store, the outbox, dead letters of contract rejects, the relay, the
   API and every consumer only ever see protected values (decision 0011).
2. **Contracts** on the protected events: a contract describes what consumers receive.
3. The new contract states and their schema-change events are stored, then the batch is accepted
   with the contract rejects as dead letters. A :class:`ContractConflictError` (another process
   changed a state meanwhile) re-runs 2-3 against the new state, a few times.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from gateway.events.model import Event
from gateway.governance.contracts import Contract, ContractEnforcer, ContractOutcome
from gateway.governance.pii import PiiPolicy, PiiPolicySet, apply_pii_all
from gateway.store.contracts import ContractConflictError, ContractState, ContractUpdate

__all__ = ["Governance", "load_schema"]

_CONFLICT_ATTEMPTS = 5


class _Store(Protocol):
    def load_contract_states(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], ContractState]: ...

    def save_contract_updates(self, updates: Sequence[ContractUpdate], events: Sequence[Event] = ()) -> None: ...

    def accept(self, batch: Sequence[Event], **kwargs: Any) -> Any: ...


def load_schema(value: Any, where: str = "schema") -> Any:
    """A contract's schema: inline (a mapping or boolean) or the path of a JSON file.

    Raises:
        ValueError: naming ``where``, the file and what is wrong.
    """
    if value is None or isinstance(value, (dict, bool)):
        return value
    if isinstance(value, str):
        path = Path(value)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{where}: cannot read schema file {value!r} ({exc.strerror or exc})") from None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{where}: schema file {value!r} is not JSON: {exc}") from None
    raise ValueError(f"{where}: expected an inline JSON Schema (a mapping) or a file path, got {type(value).__name__}")


class Governance:
    """PII policies and contracts, applied right before the store accepts events.

    Args:
        pii: compiled PII policies (may be empty).
        enforcer: the contract enforcer, or ``None`` without contracts.
    """

    def __init__(self, pii: PiiPolicySet, enforcer: ContractEnforcer | None) -> None:
        self.pii = pii
        self.enforcer = enforcer

    @classmethod
    def from_settings(cls, settings: Any, store: Any) -> Governance:
        """Build from ``Settings.governance`` (or the whole ``Settings``) and the store."""
        gov = getattr(settings, "governance", settings)
        secret = gov.pii.secret.get_secret_value() if gov.pii.secret is not None else None
        pii = PiiPolicySet(
            [PiiPolicy(p.path, p.action, tuple(p.types), p.keep_last) for p in gov.pii.policies], secret
        )
        contracts = [
            Contract(tuple(c.types), c.mode, load_schema(c.schema_, f"governance.contracts[{i}].schema"),
                     c.infer_required)
            for i, c in enumerate(gov.contracts)
        ]
        enforcer = ContractEnforcer(contracts, store, schema_change_type=gov.schema_change_type) if contracts else None
        return cls(pii, enforcer)

    @property
    def active(self) -> bool:
        """Whether anything is configured (else :meth:`accept` is a plain ``store.accept``)."""
        return bool(self.pii) or self.enforcer is not None

    def prepare(self, events: Sequence[Event], source_name: str | None = None) -> ContractOutcome:
        """PII policies then contracts; nothing written (see :class:`ContractOutcome`)."""
        protected = apply_pii_all(events, self.pii)
        if self.enforcer is None:
            return ContractOutcome(accepted=protected)
        return self.enforcer.check(protected, source_name)

    def accept(
        self,
        store: _Store,
        events: Sequence[Event],
        *,
        source_name: str | None = None,
        rejects: Sequence[dict[str, Any]] = (),
        **accept_kwargs: Any,
    ) -> tuple[Any, ContractOutcome]:
        """Govern ``events`` and accept them: the drop-in replacement of ``store.accept``.

        Args:
            store: the event store (with the contract mixin).
            events: the batch.
            source_name: as for ``accept`` (and the lineage of rejects and change events).
            rejects: the caller's own dead letters (unmappable records), accepted together.
            **accept_kwargs: passed to ``store.accept`` (``cursor``, ``epoch``, ``write_cursor``).

        Returns:
            ``(AcceptResult, ContractOutcome)``.

        Raises:
            ContractConflictError: states kept changing under this batch (transient: retry).
            FencingError, StoreUnavailableError: from the store, as ``accept`` raises them.
        """
        for attempt in range(_CONFLICT_ATTEMPTS):
            outcome = self.prepare(events, source_name)
            try:
                if outcome.updates or outcome.extra_events:
                    store.save_contract_updates(outcome.updates, outcome.extra_events)
            except ContractConflictError:
                if attempt == _CONFLICT_ATTEMPTS - 1:
                    raise
                continue
            result = store.accept(
                outcome.accepted, source_name=source_name, rejects=[*rejects, *outcome.rejects], **accept_kwargs
            )
            return result, outcome
        raise AssertionError("unreachable")  # pragma: no cover
