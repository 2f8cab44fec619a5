"""Authentication and authorisation of the REST API: API keys as bearer tokens, scopes, source
restrictions and the per-key rate limit (docs/security.md).

Every ``/v1`` route takes a :func:`require_scope` dependency, which answers

- **401** (``WWW-Authenticate: Bearer``) when the ``Authorization`` header is missing, is not
  ``Bearer gw_...``, or names an unknown or revoked key;
- **429** (``Retry-After``) when the key is over its rate;
- **403** when the key lacks the scope (``admin`` implies every scope);

and otherwise returns the caller's :class:`Principal`. Routes then apply the key's source
restriction with :meth:`Principal.allows_source`: another source's event is a 404, as if it did
not exist. With ``api.auth: false`` (dev and test profiles only) every request acts as
:data:`ANONYMOUS`, an unrestricted admin.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.api.limits import KeyRateLimiter
from gateway.api.problems import ApiProblem
from gateway.config import Settings
from gateway.errors import ConfigurationError
from gateway.store import SCOPES, Actor, ApiKey, EventStore
from gateway.store.keys import parse_token, token_digest

__all__ = [
    "ANONYMOUS",
    "SCOPES",
    "AdminDep",
    "AuthGateMiddleware",
    "Authenticator",
    "EventsReadDep",
    "EventsWriteDep",
    "Principal",
    "SourcesAdminDep",
    "get_authenticator",
    "key_secret",
    "require_scope",
]

log = logging.getLogger(__name__)

#: Seconds between two ``last_used_at`` writes of one key by one process.
TOUCH_INTERVAL = 60.0
_REALM = 'Bearer realm="legacy-gateway"'
# A digest to compare against when the key id is unknown, so that path does the same work.
_NO_DIGEST = "0" * 64

# Documents the scheme in OpenAPI; the header is parsed by Authenticator for precise errors.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    bearerFormat="gw_<id>_<secret>",
    description="An API key from `gateway keys create` or POST /v1/keys: `Authorization: Bearer gw_...`.",
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key, or :data:`ANONYMOUS` when ``api.auth`` is off.

    Attributes:
        key_id: the key's public id (``None`` for anonymous).
        name: the key's name.
        scopes: granted scopes.
        sources: gateway sources it may touch; ``None`` for every source.
    """

    key_id: str | None
    name: str
    scopes: frozenset[str]
    sources: frozenset[str] | None = None

    def has_scope(self, scope: str) -> bool:
        """Whether the key grants ``scope`` (``admin`` grants every scope)."""
        return "admin" in self.scopes or scope in self.scopes

    def allows_source(self, source_name: str | None) -> bool:
        """Whether the key may touch gateway source ``source_name`` (unrestricted keys: every one)."""
        return self.sources is None or (source_name is not None and source_name in self.sources)

    @property
    def restricted(self) -> bool:
        """Whether the key is limited to some sources."""
        return self.sources is not None

    @property
    def actor(self) -> Actor:
        """This principal as the actor of an audited action."""
        return Actor(self.key_id, self.name)

    @classmethod
    def from_key(cls, key: ApiKey) -> Principal:
        """The principal of a stored key."""
        return cls(key.id, key.name, frozenset(key.scopes), frozenset(key.sources) if key.sources is not None else None)


#: The principal of every request while ``api.auth`` is off: an unrestricted admin.
ANONYMOUS = Principal(None, "anonymous", frozenset({"admin"}))


def key_secret(settings: Settings, store: EventStore) -> bytes:
    """The server secret keying API key digests.

    ``api.key_secret`` when set; otherwise, in profiles dev and test, the store's own generated
    secret (:meth:`~gateway.store.keys.ApiKeyRepository.local_key_secret`).

    Raises:
        ConfigurationError: profile prod without ``api.key_secret``.
    """
    configured = settings.api.key_secret
    if configured is not None:
        return configured.get_secret_value().encode("utf-8")
    if settings.profile == "prod":
        raise ConfigurationError(
            "api.key_secret: profile prod requires a server secret of at least 32 characters to digest API keys; "
            "set GATEWAY_API__KEY_SECRET (or key_secret: ${VAR} in the file)"
        )
    return store.local_key_secret()


def _unauthorized(detail: str, *, invalid_token: bool) -> ApiProblem:
    challenge = f'{_REALM}, error="invalid_token"' if invalid_token else _REALM
    return ApiProblem(401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": challenge})


class Authenticator:
    """Checks bearer tokens against the store and applies the per-key rate limit.

    The server secret is resolved on first use (in dev and test it may come from the store).

    Args:
        settings: ``api.auth``, ``api.key_secret`` and the rate limit settings.
        store: where the keys are.
        clock: monotonic clock for the rate limit and ``last_used_at`` throttling.

    Raises:
        ConfigurationError: auth is on, the profile is prod and ``api.key_secret`` is unset.
    """

    def __init__(self, settings: Settings, store: EventStore, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = settings.api.auth
        self._settings = settings
        self._store = store
        self._clock = clock
        self._secret: bytes | None = None
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self.limiter = KeyRateLimiter(settings.api.rate_limit_per_second, settings.api.rate_limit_burst, clock=clock)
        if self.enabled and settings.profile == "prod":
            self._secret = key_secret(settings, store)  # fail at start-up, not at the first request

    def secret(self) -> bytes:
        """The server secret (resolved once)."""
        with self._lock:
            if self._secret is None:
                self._secret = key_secret(self._settings, self._store)
            return self._secret

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value.

        Raises:
            ApiProblem: 401 for a missing, malformed, unknown or revoked key.
        """
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise _unauthorized("this route needs an API key: send Authorization: Bearer gw_...", invalid_token=False)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("expected the Authorization header 'Bearer <API key>'", invalid_token=True)
        key_id = parse_token(token)
        if key_id is None:
            raise _unauthorized("malformed API key: expected gw_<16 hex digits>_<43 characters>", invalid_token=True)
        found = self._store.api_key_with_digest(key_id)
        digest = token_digest(self.secret(), token)
        # Constant-time comparison, also when the id is unknown (then against a dummy digest).
        matches = hmac.compare_digest(digest, found[1] if found is not None else _NO_DIGEST)
        if found is None or not matches:
            raise _unauthorized("unknown API key", invalid_token=True)
        key = found[0]
        if key.revoked:
            raise _unauthorized(f"API key {key.id} was revoked", invalid_token=True)
        self._touch(key.id)
        return Principal.from_key(key)

    def _touch(self, key_id: str) -> None:
        """Record ``last_used_at``, at most once per :data:`TOUCH_INTERVAL` per key and process."""
        now = self._clock()
        with self._lock:
            last = self._touched.get(key_id)
            if last is not None and now - last < TOUCH_INTERVAL:
                return
            self._touched[key_id] = now
        try:
            self._store.touch_api_key(key_id)
        except Exception as exc:  # noqa: BLE001 -- bookkeeping only: never fail the request for it
            log.warning("could not record last use of API key %s: %s", key_id, type(exc).__name__)

    def rate_limit(self, principal: Principal) -> None:
        """Take one request from the key's bucket.

        Raises:
            ApiProblem: 429 with ``Retry-After`` when the key is over its rate.
        """
        if principal.key_id is None:
            return
        wait = self.limiter.acquire(principal.key_id)
        if wait is not None:
            seconds = max(1, int(wait + 0.999))
            raise ApiProblem(
                429, "rate-limited", "Too Many Requests",
                f"API key {principal.key_id} is over its rate limit of {self.limiter.rate:g} requests per second "
                f"(burst {self.limiter.burst}); retry after {seconds} s",
                headers={"Retry-After": str(seconds)},
            )


class AuthGateMiddleware:
    """Authenticates ``/v1`` requests **before** the route reads its body (pure ASGI).

    FastAPI parses and validates a route's body before it resolves the route's dependencies, so
    a request without a key and with a malformed body would get 400/422 from the body instead of
    401. This gate answers 401 (problem JSON, ``WWW-Authenticate``) first; a principal it
    authenticated is kept in ``request.state.principal`` for :func:`require_scope`, which still
    checks the scope (403) and the rate limit (429). Anything else -- e.g. the store being down --
    is left to the route and its error handlers.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        auth = getattr(getattr(scope.get("app"), "state", None), "authenticator", None)
        if not (path == "/v1" or path.startswith("/v1/")) or auth is None or not auth.enabled:
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        try:
            principal = await run_in_threadpool(auth.authenticate, header)
        except ApiProblem as problem:
            from gateway.api.problems import problem_response

            response = problem_response(
                Request(scope), problem.status, type_=problem.type, title=problem.title, detail=problem.detail,
                headers=problem.headers,
            )
            await response(scope, receive, send)
            return
        except Exception:  # noqa: BLE001 -- not a 401: the route's dependency runs again and reports it
            principal = None
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def get_authenticator(request: Request) -> Authenticator:
    """The app's :class:`Authenticator`."""
    return request.app.state.authenticator  # type: ignore[no-any-return]


@functools.cache
def require_scope(scope: str) -> Callable[..., Principal]:
    """A dependency that authenticates the request and requires ``scope``.

    The same function is returned for the same scope, so FastAPI runs it once per request even
    when a router and its route both declare it (one token taken from the rate limit).

    Args:
        scope: one of :data:`~gateway.store.keys.SCOPES`.

    Returns:
        The dependency; it returns the caller's :class:`Principal`.

    Raises:
        ValueError: ``scope`` is unknown (a programming error, raised at import).
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")

    def dependency(
        request: Request,
        auth: Annotated[Authenticator, Depends(get_authenticator)],
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        # Authenticated by AuthGateMiddleware already (before any body was read), else here.
        principal = getattr(request.state, "principal", None) or auth.authenticate(request.headers.get("authorization"))
        auth.rate_limit(principal)
        if not principal.has_scope(scope):
            raise ApiProblem(
                403, "forbidden", "Forbidden",
                f"API key {principal.key_id} lacks the scope {scope!r} (it has {', '.join(sorted(principal.scopes))})",
                headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{scope}"'},
            )
        return principal

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency


#: The caller, required to hold ``events:read``.
EventsReadDep = Annotated[Principal, Depends(require_scope("events:read"))]
#: The caller, required to hold ``events:write``.
EventsWriteDep = Annotated[Principal, Depends(require_scope("events:write"))]
#: The caller, required to hold ``sources:admin``.
SourcesAdminDep = Annotated[Principal, Depends(require_scope("sources:admin"))]
#: The caller, required to hold ``admin``.
AdminDep = Annotated[Principal, Depends(require_scope("admin"))]
