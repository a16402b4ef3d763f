"""RFC 9457 problem details for every error the API returns.

Domain code raises `Problem` (or one of its subclasses); validation errors, unknown
routes and anything unexpected are converted here, so a client always gets
`application/problem+json` with a `detail` that says what to fix.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.states import IllegalTransition

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger()


class Problem(StarletteHTTPException):
    """An error for the client. A subclass of Starlette's HTTPException so that raising
    it anywhere (even inside a middleware's receive) reaches our handler."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(status, detail, headers)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.headers = headers or {}
        self.extensions = extensions


def not_found(what: str, ident: str) -> Problem:
    return Problem(404, "not-found", "Not found", f"no {what} with id or name {ident!r}")


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:unlearn:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status,
            exc.slug,
            exc.title,
            exc.detail,
            request.url.path,
            dict(exc.headers or {}),
            **exc.extensions,
        )

    @app.exception_handler(IllegalTransition)
    async def _transition(request: Request, exc: IllegalTransition) -> JSONResponse:
        return problem_response(
            409,
            "illegal-transition",
            "Conflict with the current state",
            str(exc),
            request.url.path,
            current=exc.current,
            target=exc.target,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _loc(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")}
            for e in exc.errors()
        ]
        if any(e["type"] == "json_invalid" for e in errors):
            return problem_response(
                400,
                "malformed-json",
                "Malformed JSON",
                "the request body is not valid JSON: " + errors[0]["message"],
                request.url.path,
            )
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        return problem_response(
            422,
            "validation-error",
            "The request is not valid",
            summary + more,
            request.url.path,
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(
            exc.status_code, "http-error"
        )
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs"
        return problem_response(
            exc.status_code,
            slug,
            "HTTP error",
            detail,
            request.url.path,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        return problem_response(
            500,
            "internal-error",
            "Internal error",
            "the service failed to handle this request; nothing was stored. Try again, "
            "and report it if it persists.",
            request.url.path,
        )
