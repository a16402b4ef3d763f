"""The FastAPI application: routers, error handlers, health, readiness, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service import errors
from service.adapters.router import router as adapters_router
from service.config import get_settings
from service.db import get_engine
from service.deps import RAW_BODY_MODELS
from service.erasure_requests.router import router as requests_router
from service.jobs.router import router as jobs_router
from service.logs import configure as configure_logs
from service.metrics import render as render_metrics
from service.middleware import BodySizeLimit, HttpMetrics
from service.models_registry.router import router as models_router
from service.queue import broker_reachable
from service.trail.router import router as trail_router

DESCRIPTION = """
Erasure requests (GDPR Art. 17) for LLMs: submit what a model must forget about a
person, follow the unlearning job, and download the audited LoRA adapter that forgets it.
Errors are RFC 9457 `application/problem+json`. Authenticate with
`Authorization: Bearer <API key>`.
"""


def create_app() -> FastAPI:
    settings = get_settings()
    configure_logs(settings.log_level, settings.log_json)
    app = FastAPI(title="Unlearning service", version="1.0.0", description=DESCRIPTION)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetrics)
    for router in (models_router, adapters_router, requests_router, jobs_router, trail_router):
        app.include_router(router)

    _document_raw_bodies(app)

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Database and broker are reachable")
    def readyz() -> JSONResponse:
        checks = {"database": _database_ok(), "broker": broker_reachable()}
        if all(checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        failing = ", ".join(k for k, ok in checks.items() if not ok)
        return errors.problem_response(
            503, "not-ready", "Not ready", f"cannot reach: {failing}", "/readyz", checks=checks
        )

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(render_metrics(), media_type="text/plain; version=0.0.4")

    return app


def _document_raw_bodies(app: FastAPI) -> None:
    """Add the schemas of bodies that handlers validate themselves (`deps.raw_json_body`)
    to the OpenAPI components their `$ref`s point at."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in RAW_BODY_MODELS:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema or plain()

    app.openapi = openapi  # type: ignore[method-assign]


def _database_ok() -> bool:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
