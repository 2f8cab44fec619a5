"""PII policies per field path: drop, mask, keyed hash, tokenize (issue 8; decision 0011).

Policies are compiled once (:class:`PiiPolicySet`) and applied per event by :func:`apply_pii`, a
pure function on the hot path: the policies of an event type are resolved once per type and
cached; applying a path copies only the containers along it.

Actions (``null`` values stay ``null`` for every action but ``drop``: a null carries no PII):

* ``drop``: the field is removed (an array element addressed by the path is removed).
* ``mask``: the value becomes the string ``"****"``; with ``keep_last: n`` the last ``n``
  characters of its text stay visible, only when the text is longer than ``2n`` characters.
* ``hash``: HMAC-SHA256 keyed with ``governance.pii.secret`` over the value's canonical text
  (strings as they are, numbers and booleans as JSON text -- so ``123`` and ``"123"`` hash alike,
  objects and arrays as sorted compact JSON); 64 lowercase hex digits. Deterministic per secret:
  equal values join across events and sources; without the secret nobody can test a guess.
* ``tokenize``: deterministic, keyed, **format-preserving and not reversible**: every digit becomes
  a digit, every letter a letter of the same case, other characters (``-``, ``@``, ``.``, spaces)
  stay, all derived from HMAC-SHA256 of the whole value; integers stay integers with as many
  digits. A token fits the field's schema and format checks (an SSN stays ``ddd-dd-dddd``) while
  revealing only length and layout. There is no token vault: see decision 0011 for why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.events.model import Event
from gateway.events.topics import topic_matches
from gateway.governance.paths import DROP, FieldPath, compile_path

__all__ = ["PII_ACTIONS", "PiiPolicy", "PiiPolicySet", "apply_pii", "apply_pii_all", "canonical_text", "keyed_hash", "tokenize"]

PiiAction = Literal["drop", "mask", "hash", "tokenize"]
PII_ACTIONS: tuple[str, ...] = ("drop", "mask", "hash", "tokenize")
MASK = "****"
_TOKEN_LABEL = b"legacy-gateway/pii/tokenize/v1"
_TYPE_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class PiiPolicy:
    """One policy: an action on a field path, for the event types matching ``types``.

    Attributes:
        path: the field path (see :func:`gateway.governance.paths.compile_path`).
        action: ``drop``, ``mask``, ``hash`` or ``tokenize``.
        types: AMQP topic patterns over event types (``*`` one word, ``#`` any); default all.
        keep_last: ``mask`` only: trailing characters left visible.
    """

    path: str
    action: PiiAction
    types: tuple[str, ...] = ("#",)
    keep_last: int = 0


def canonical_text(value: Any) -> str:
    """The text a value is hashed or tokenized as (see the module docstring)."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def keyed_hash(value: Any, key: bytes) -> str:
    """HMAC-SHA256 of the value's canonical text, as 64 hex digits."""
    return hmac.new(key, canonical_text(value).encode("utf-8"), hashlib.sha256).hexdigest()


def _stream(key: bytes, text: str, n: int) -> bytes:
    """``n`` pseudo-random bytes determined by (key, text)."""
    out = b""
    counter = 0
    base = text.encode("utf-8")
    while len(out) < n:
        out += hmac.new(key, counter.to_bytes(4, "big") + base, hashlib.sha256).digest()
        counter += 1
    return out


def _token_text(text: str, key: bytes) -> str:
    rnd = _stream(key, text, len(text))
    out = []
    for ch, b in zip(text, rnd, strict=False):
        if ch.isdigit():
            out.append(chr(48 + b % 10))
        elif ch.isalpha():
            out.append(chr((65 if ch.isupper() else 97) + b % 26))
        else:
            out.append(ch)
    return "".join(out)


def tokenize(value: Any, key: bytes) -> Any:
    """Format-preserving, deterministic, keyed token of ``value`` (``key``: the tokenize key)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return _stream(key, "bool:" + canonical_text(value), 1)[0] % 2 == 1
    if isinstance(value, int):
        digits = str(abs(value))
        tok = _token_text(digits, key)
        if len(tok) > 1 and tok[0] == "0":  # keep the number of digits
            tok = str(1 + int(tok[0:1]) + _stream(key, "lead:" + digits, 1)[0] % 9) + tok[1:]
        return -int(tok) if value < 0 else int(tok)
    if isinstance(value, float):
        text = repr(value)
        it = iter(_token_text("".join(c for c in text if c.isdigit()), key))
        return float("".join(next(it) if c.isdigit() else c for c in text))
    if isinstance(value, str):
        return _token_text(value, key)
    if isinstance(value, list):
        return [tokenize(v, key) for v in value]
    if isinstance(value, dict):
        return {k: tokenize(v, key) for k, v in value.items()}
    return _token_text(canonical_text(value), key)


def _mask(keep_last: int) -> Callable[[Any], Any]:
    def mask(value: Any) -> Any:
        if value is None:
            return None
        if keep_last:
            text = canonical_text(value)
            if len(text) > 2 * keep_last:
                return MASK + text[-keep_last:]
        return MASK

    return mask


def _transform(policy: PiiPolicy, hash_key: bytes | None, token_key: bytes | None) -> Callable[[Any], Any]:
    if policy.action == "drop":
        return lambda _value: DROP
    if policy.action == "mask":
        return _mask(policy.keep_last)
    if policy.action == "hash":
        assert hash_key is not None
        hk = hash_key
        return lambda value: None if value is None else keyed_hash(value, hk)
    assert token_key is not None
    tk = token_key
    return lambda value: tokenize(value, tk)


@dataclass(frozen=True, slots=True)
class _Compiled:
    path: FieldPath
    types: tuple[str, ...]
    fn: Callable[[Any], Any]
    action: str


class PiiPolicySet:
    """Compiled PII policies; build once (at start), apply per event with :func:`apply_pii`.

    Args:
        policies: the policies, applied in order (a field hashed by an earlier policy is hashed
            again by a later one on the same path: do not configure overlapping paths).
        secret: the key of ``hash`` and ``tokenize`` (bytes or str; at least 32 characters).

    Raises:
        ValueError: a path does not compile, an action is unknown, or hash/tokenize has no secret.
    """

    def __init__(self, policies: Iterable[PiiPolicy], secret: bytes | str | None = None) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else secret
        # Separate keys per action: a hash never equals the token-stream input of the same value.
        hash_key = hmac.new(key, b"legacy-gateway/pii/hash/v1", hashlib.sha256).digest() if key else None
        token_key = hmac.new(key, _TOKEN_LABEL, hashlib.sha256).digest() if key else None
        compiled: list[_Compiled] = []
        for i, pol in enumerate(policies):
            if pol.action not in PII_ACTIONS:
                raise ValueError(f"policies[{i}].action: expected one of {', '.join(PII_ACTIONS)}, got {pol.action!r}")
            if pol.action in ("hash", "tokenize") and not key:
                raise ValueError(f"policies[{i}] ({pol.action} {pol.path}): needs governance.pii.secret")
            try:
                path = compile_path(pol.path)
            except ValueError as exc:
                raise ValueError(f"policies[{i}].path: {exc}") from None
            compiled.append(_Compiled(path, tuple(pol.types), _transform(pol, hash_key, token_key), pol.action))
        self._policies = tuple(compiled)
        self._by_type: dict[str, tuple[_Compiled, ...]] = {}
        self.paths: tuple[str, ...] = tuple(c.path.text for c in compiled)

    def __repr__(self) -> str:  # never the secret
        return f"PiiPolicySet({len(self._policies)} policies: {', '.join(self.paths)})"

    def __bool__(self) -> bool:
        return bool(self._policies)

    def for_type(self, event_type: str) -> tuple[_Compiled, ...]:
        """The policies applying to ``event_type`` (cached per type)."""
        found = self._by_type.get(event_type)
        if found is None:
            found = tuple(c for c in self._policies if any(topic_matches(t, event_type) for t in c.types))
            if len(self._by_type) >= _TYPE_CACHE_MAX:
                self._by_type.clear()
            self._by_type[event_type] = found
        return found


def apply_pii(event: Any, policies: PiiPolicySet) -> Any:
    """Apply the policies to one event; pure (the input is never changed).

    Args:
        event: an :class:`~gateway.events.Event`, or a structured-mode envelope (a mapping with
            ``type``, ``data`` and maybe ``subject``).
        policies: the compiled policy set.

    Returns:
        The same kind of object: the input itself when no policy changed anything, else a copy
        sharing every untouched part.
    """
    if isinstance(event, Event):
        rules = policies.for_type(event.type)
        if not rules:
            return event
        data, subject = _apply(rules, event.data, event.subject)
        if data is event.data and subject is event.subject:
            return event
        return dataclasses.replace(event, data=data, subject=subject)
    if isinstance(event, Mapping):
        rules = policies.for_type(str(event.get("type", "")))
        if not rules:
            return event
        data, subject = _apply(rules, event.get("data"), event.get("subject"))
        if data is event.get("data") and subject is event.get("subject"):
            return event
        out = dict(event)
        if "data" in out:
            out["data"] = data
        if subject is None:
            out.pop("subject", None)
        else:
            out["subject"] = subject
        return out
    raise TypeError(f"apply_pii expects an Event or an envelope mapping, got {type(event).__name__}")


def apply_pii_all(events: Sequence[Event], policies: PiiPolicySet) -> list[Event]:
    """:func:`apply_pii` over a batch."""
    if not policies:
        return list(events)
    return [apply_pii(ev, policies) for ev in events]


def _apply(rules: tuple[_Compiled, ...], data: Any, subject: Any) -> tuple[Any, Any]:
    for rule in rules:
        if rule.path.root == "data":
            if rule.path.steps:
                data = rule.path.apply(data, rule.fn)
            elif data is not None:
                new = rule.fn(data)
                data = None if new is DROP else new
        elif subject is not None:
            new = rule.fn(subject)
            subject = None if new is DROP else new
    return data, subject
