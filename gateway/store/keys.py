"""API keys (issue 8): bearer tokens whose digests alone are stored.

A token is ``gw_<id>_<secret>``: ``id`` (16 hex digits) is public and names the key in lists and
the audit log; ``secret`` is 43 URL-safe characters (256 random bits). The store keeps only
``HMAC-SHA256(server secret, token)``, so a copy of the database does not hold usable tokens,
and a token is checked with :func:`hmac.compare_digest` (:mod:`gateway.api.auth`). The token
is returned once, by :meth:`ApiKeyRepository.create_api_key`, and never again.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update

from gateway.store._sql import guard, insert_ignore
from gateway.store.audit import Actor, AuditRepository
from gateway.store.schema import api_keys, local_secrets

__all__ = [
    "SCOPES",
    "TOKEN_PATTERN",
    "ApiKey",
    "ApiKeyRepository",
    "check_key_fields",
    "parse_token",
    "token_digest",
]

#: Every scope; ``admin`` implies the others.
SCOPES = ("events:write", "events:read", "sources:admin", "admin")

#: The shape of a token: ``gw_`` + 16 hex digits (the key id) + ``_`` + 43 URL-safe characters.
TOKEN_PATTERN = re.compile(r"^gw_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:@-]{0,127}$")
_SOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DEV_SECRET = "api_key_secret"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as listed: never the token, never its digest.

    Attributes:
        id: public key id (the token's second part).
        name: what the key is for.
        scopes: granted scopes (``admin`` implies all).
        sources: gateway sources the key may touch; ``None`` for every source.
        created_at, revoked_at, last_used_at: aware UTC (``last_used_at`` at most a minute stale).
    """

    id: str
    name: str
    scopes: tuple[str, ...]
    sources: tuple[str, ...] | None
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        """Whether the key was revoked."""
        return self.revoked_at is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view (times as ISO 8601)."""
        return {
            "id": self.id, "name": self.name, "scopes": list(self.scopes),
            "sources": list(self.sources) if self.sources is not None else None,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
        }


def token_digest(secret: bytes, token: str) -> str:
    """``HMAC-SHA256(secret, token)`` as 64 hex digits: what the store keeps of a token."""
    return hmac.new(secret, token.encode("utf-8"), hashlib.sha256).hexdigest()


def parse_token(token: str) -> str | None:
    """The key id of a well-formed token, or ``None``."""
    match = TOKEN_PATTERN.fullmatch(token)
    return match.group(1) if match else None


def check_key_fields(
    name: str, scopes: Sequence[str], sources: Sequence[str] | None
) -> tuple[str, tuple[str, ...], tuple[str, ...] | None]:
    """Validate and normalise a new key's fields.

    Returns:
        ``(name, scopes, sources)``: scopes deduplicated in :data:`SCOPES` order, sources sorted.

    Raises:
        ValueError: naming the field, the bad value and what is expected.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"name: expected 1-128 letters, digits, spaces or ._:@- starting with a letter or digit; got {name!r}"
        )
    if not scopes:
        raise ValueError(f"scopes: give at least one of {', '.join(SCOPES)}")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"scopes: unknown scope(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(SCOPES)}")
    norm_scopes = tuple(s for s in SCOPES if s in scopes)
    norm_sources: tuple[str, ...] | None = None
    if sources is not None:
        if not sources:
            raise ValueError("sources: give at least one source name, or none at all for every source")
        bad = [s for s in sources if not _SOURCE.fullmatch(s)]
        if bad:
            raise ValueError(f"sources: not a source name: {', '.join(map(repr, bad))}")
        if "admin" in norm_scopes:
            raise ValueError("sources: an admin key reaches every source; leave sources out or drop the admin scope")
        norm_sources = tuple(sorted(set(sources)))
    return name, norm_scopes, norm_sources


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id, name=row.name, scopes=tuple(row.scopes or ()),
        sources=tuple(row.sources) if row.sources is not None else None,
        created_at=row.created_at, revoked_at=row.revoked_at, last_used_at=row.last_used_at,
    )


class ApiKeyRepository(AuditRepository):
    """API key methods of :class:`~gateway.store.EventStore` (mixed in); key changes are audited."""

    def create_api_key(
        self,
        name: str,
        scopes: Sequence[str],
        sources: Sequence[str] | None = None,
        *,
        secret: bytes,
        actor: Actor | None = None,
    ) -> tuple[ApiKey, str]:
        """Create a key; returns it and its token. The token is not stored and cannot be shown again.

        Args:
            name: what the key is for.
            scopes: some of :data:`SCOPES`.
            sources: gateway sources it may touch (``None``: every source; not with ``admin``).
            secret: the server secret keying the digest (``api.key_secret``).
            actor: who creates it; audited (``key.create``) in the same transaction.

        Raises:
            ValueError: a field is invalid (see :func:`check_key_fields`).
            StoreUnavailableError: the transaction did not commit.
        """
        name, norm_scopes, norm_sources = check_key_fields(name, scopes, sources)
        key_id = secrets.token_hex(8)
        token = f"gw_{key_id}_{secrets.token_urlsafe(32)}"
        now = self._clock()
        row = {
            "id": key_id, "name": name, "digest": token_digest(secret, token), "scopes": list(norm_scopes),
            "sources": list(norm_sources) if norm_sources is not None else None, "created_at": now,
        }
        with guard("create_api_key"), self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**row))
            if actor is not None:
                self._write_audit(conn, actor, "key.create", key_id,
                                  {"name": name, "scopes": list(norm_scopes), "sources": row["sources"]})
        return ApiKey(key_id, name, norm_scopes, norm_sources, now), token

    def api_key_with_digest(self, key_id: str) -> tuple[ApiKey, str] | None:
        """The key ``key_id`` and its stored digest (for authentication only), or ``None``."""
        with guard("api_key_with_digest"), self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return (_key(row), row.digest) if row is not None else None

    def get_api_key(self, key_id: str) -> ApiKey | None:
        """The key ``key_id`` (without digest), or ``None``."""
        found = self.api_key_with_digest(key_id)
        return found[0] if found is not None else None

    def list_api_keys(self, *, include_revoked: bool = True) -> list[ApiKey]:
        """Every key, oldest first (never a token or digest)."""
        c = api_keys.c
        query = select(c.id, c.name, c.scopes, c.sources, c.created_at, c.revoked_at, c.last_used_at)
        if not include_revoked:
            query = query.where(c.revoked_at.is_(None))
        with guard("list_api_keys"), self.engine.connect() as conn:
            rows = conn.execute(query.order_by(c.created_at, c.id)).all()
        return [_key(r) for r in rows]

    def revoke_api_key(self, key_id: str, *, actor: Actor | None = None) -> ApiKey | None:
        """Revoke a key at once (its next request gets 401); revoking it again changes nothing.

        Args:
            key_id: the key.
            actor: who revokes it; audited (``key.revoke``) in the same transaction, only when the
                key was not revoked already.

        Returns:
            The key as it is now, or ``None`` when there is no such key.
        """
        c = api_keys.c
        with guard("revoke_api_key"), self.engine.begin() as conn:
            changed = conn.execute(
                update(api_keys).where(c.id == key_id, c.revoked_at.is_(None)).values(revoked_at=self._clock())
            ).rowcount
            if changed and actor is not None:
                self._write_audit(conn, actor, "key.revoke", key_id, None)
            row = conn.execute(select(api_keys).where(c.id == key_id)).first()
        return _key(row) if row is not None else None

    def touch_api_key(self, key_id: str) -> None:
        """Set the key's ``last_used_at`` to now."""
        with guard("touch_api_key"), self.engine.begin() as conn:
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=self._clock()))

    def local_key_secret(self) -> bytes:
        """This store's own API key secret, generated on first use (dev and test profiles only).

        Every process on the same store gets the same secret, so ``gateway keys create`` and the
        API agree. It lives in the store beside the digests: configure ``api.key_secret`` in
        production instead.
        """
        with guard("local_key_secret"), self.engine.begin() as conn:
            conn.execute(
                insert_ignore(conn, local_secrets, ["name"]),
                {"name": _DEV_SECRET, "value": secrets.token_hex(32), "created_at": self._clock()},
            )
            value = conn.execute(select(local_secrets.c.value).where(local_secrets.c.name == _DEV_SECRET)).scalar_one()
        return bytes.fromhex(value)
