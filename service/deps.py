"""Typed dependencies: a database session, the authenticated principal, scope checks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from service.access import service as access
from service.access.scopes import Scope
from service.db import get_sessionmaker
from service.errors import Problem

M = TypeVar("M", bound=BaseModel)


async def get_session() -> AsyncIterator[Session]:
    # Async on purpose: the close (which returns the connection to the pool) then runs on
    # the event loop. A sync cleanup would wait for a threadpool slot while holding a
    # connection, and under load every thread could be waiting for a connection held by
    # a request waiting for a thread.
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="unlearn"'}


async def bearer_token(request: Request) -> str:
    """The API key the request carries (401 if none); `get_principal` checks it."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    else:
        token = request.headers.get("x-api-key")
    if not token:
        raise Problem(
            401,
            "unauthenticated",
            "Authentication required",
            "send an API key as 'Authorization: Bearer ulk_...' (mint one with "
            "`unlearn keys create`)",
            headers=_CHALLENGE,
        )
    return token


TokenDep = Annotated[str, Depends(bearer_token)]


def authenticate(session: Session, token: str) -> access.Principal:
    """The principal behind an API key, or 401. Leaves the transaction open."""
    principal = access.authenticate(session, token)
    if principal is None:
        raise Problem(
            401,
            "invalid-key",
            "Invalid API key",
            "the API key is unknown, malformed or revoked",
            headers=_CHALLENGE,
        )
    return principal


def check_scope(principal: access.Principal, scope: Scope) -> None:
    if not principal.has(scope):
        raise Problem(
            403,
            "missing-scope",
            "Missing scope",
            f"this API key lacks the '{scope.value}' scope; ask an admin for a key with it",
            required_scope=scope.value,
        )


def get_principal(token: TokenDep, session: SessionDep) -> access.Principal:
    try:
        return authenticate(session, token)
    finally:
        # End the read so the connection goes back to the pool before the next threadpool
        # hop (a request holding a connection while it waits for a thread can deadlock).
        session.commit()


PrincipalDep = Annotated[access.Principal, Depends(get_principal)]


# The checks below touch no database: `async def` keeps them on the event loop instead of
# a threadpool hop each (FastAPI runs every plain `def` dependency in a thread).


def require(scope: Scope) -> Callable[[access.Principal], Awaitable[access.Principal]]:
    async def _check(principal: PrincipalDep) -> access.Principal:
        check_scope(principal, scope)
        return principal

    return _check


def require_any(*scopes: Scope) -> Callable[[access.Principal], Awaitable[access.Principal]]:
    async def _check(principal: PrincipalDep) -> access.Principal:
        if not any(principal.has(s) for s in scopes):
            names = " or ".join(f"'{s.value}'" for s in scopes)
            raise Problem(
                403,
                "missing-scope",
                "Missing scope",
                f"this API key has none of the scopes {names}; ask an admin for a key with one",
                required_scope=[s.value for s in scopes],
            )
        return principal

    return _check


async def require_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"send the body as application/json (got {media or 'no Content-Type'})",
        )


# Bodies a handler reads itself, so that it can judge them after the key (see the intake
# route): FastAPI then documents them from `openapi_extra`, and `service.main` adds their
# schemas to the document's components.
RAW_BODY_MODELS: list[type[BaseModel]] = []


def raw_json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that validates a `model` body with `validate_body`."""
    RAW_BODY_MODELS.append(model)
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def validate_body(model: type[M], raw: bytes) -> M:
    """The body as `model`, or the 400/422 problem FastAPI would have given for it."""
    if not raw.strip():
        detail = "the body is empty; send the request as a JSON object"
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": detail}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [_in_body(e) for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _in_body(error: Any) -> dict[str, Any]:
    out = {**error, "loc": ("body", *error["loc"])}
    if error["type"] == "json_invalid":  # "Invalid JSON: EOF while ..." -> "EOF while ..."
        out["msg"] = error.get("ctx", {}).get("error", error["msg"])
    return out
