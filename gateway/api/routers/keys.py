"""``/v1/keys``: create, list and revoke API keys (scope ``admin``); every change is audited."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.exceptions import RequestValidationError

from gateway.api.auth import AdminDep, Authenticator, get_authenticator
from gateway.api.deps import StoreDep
from gateway.api.problems import problem_responses
from gateway.api.schemas import (
    ApiKeyCreated,
    ApiKeyCreateRequest,
    ApiKeyList,
    ApiKeyOut,
)
from gateway.store import ApiKey

__all__ = ["router"]

router = APIRouter(prefix="/keys", tags=["keys"])

_AUTH = (401, 403, 429)


def _out(key: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(
        id=key.id, name=key.name, scopes=list(key.scopes),
        sources=list(key.sources) if key.sources is not None else None,
        created_at=key.created_at, revoked_at=key.revoked_at, last_used_at=key.last_used_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    responses=problem_responses(*_AUTH, 400, 422, 503),  # 400: a body that is not JSON
    summary="Create an API key (its token is returned once)",
)
def create_key(
    body: ApiKeyCreateRequest,
    principal: AdminDep,
    store: StoreDep,
    auth: Annotated[Authenticator, Depends(get_authenticator)],
) -> ApiKeyCreated:
    """Create a key with ``scopes`` and, optionally, a source restriction; answer its token.

    The token is shown in this answer only: the store keeps an HMAC-SHA256 digest of it.
    """
    try:
        key, token = store.create_api_key(
            body.name, body.scopes, body.sources, secret=auth.secret(), actor=principal.actor
        )
    except ValueError as exc:
        field, _, msg = str(exc).partition(": ")
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", field), "msg": msg or str(exc), "input": None}]
        ) from None
    return ApiKeyCreated(**_out(key).model_dump(), token=token)


@router.get(
    "",
    response_model=ApiKeyList,
    responses=problem_responses(*_AUTH, 422, 503),
    summary="List API keys (never their tokens)",
)
def list_keys(
    _principal: AdminDep,
    store: StoreDep,
    include_revoked: Annotated[bool, Query(description="Also list revoked keys.")] = True,
) -> ApiKeyList:
    """Every key, oldest first: id, name, scopes, sources and times; never a token or digest."""
    return ApiKeyList(items=[_out(k) for k in store.list_api_keys(include_revoked=include_revoked)])


KeyId = Annotated[str, Path(min_length=1, max_length=32, description="The key's id.")]


@router.delete(
    "/{key_id}",
    response_model=ApiKeyOut,
    responses=problem_responses(*_AUTH, 404, 422, 503),
    summary="Revoke an API key",
)
def revoke_key(key_id: KeyId, principal: AdminDep, store: StoreDep) -> ApiKeyOut:
    """Revoke a key at once (its next request gets 401) and answer it; revoking again changes
    nothing; 404 if unknown. Revoked keys stay listed."""
    key = store.revoke_api_key(key_id, actor=principal.actor)
    if key is None:
        raise HTTPException(404, f"no API key with id {key_id!r}")
    return _out(key)
