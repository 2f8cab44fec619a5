"""Governance at the acceptance point: JSON-Schema contracts per event type and PII policies.

See docs/governance.md and docs/decisions/0011-pii-policies.md.
"""

from gateway.governance.contracts import (
    CONTRACT_STAGE,
    MODES,
    Contract,
    ContractEnforcer,
    ContractOutcome,
)
from gateway.governance.gate import Governance, load_schema
from gateway.governance.paths import FieldPath, compile_path
from gateway.governance.pii import (
    PII_ACTIONS,
    PiiPolicy,
    PiiPolicySet,
    apply_pii,
    apply_pii_all,
    keyed_hash,
    tokenize,
)
from gateway.governance.schemas import (
    Incompatible,
    Violation,
    check_schema,
    evolve,
    fingerprint,
    infer,
    infer_many,
    violations,
)

__all__ = [
    "CONTRACT_STAGE",
    "MODES",
    "PII_ACTIONS",
    "Contract",
    "ContractEnforcer",
    "ContractOutcome",
    "FieldPath",
    "Governance",
    "Incompatible",
    "PiiPolicy",
    "PiiPolicySet",
    "Violation",
    "apply_pii",
    "apply_pii_all",
    "check_schema",
    "compile_path",
    "evolve",
    "fingerprint",
    "infer",
    "infer_many",
    "keyed_hash",
    "load_schema",
    "tokenize",
    "violations",
]
