"""Adapter versions over HTTP: manifests, and the download of audited ones."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlalchemy.orm import Session

from service.access.scopes import Scope
from service.access.service import Principal
from service.adapters import report, service
from service.adapters.models import PUBLISHED, AdapterVersion
from service.adapters.schemas import AdapterList, AdapterOut
from service.adapters.service import ARCHIVE
from service.adapters.store import get_store
from service.deps import SessionDep, require, require_any
from service.errors import Problem
from service.models_registry import service as models
from service.models_registry.models import RegisteredModel
from service.trail import service as trail

router = APIRouter(prefix="/v1/models/{name}/adapters", tags=["adapters"])
Auditor = Annotated[Principal, Depends(require(Scope.AUDIT_READ))]
Reader = Annotated[Principal, Depends(require_any(Scope.ADAPTERS_DOWNLOAD, Scope.AUDIT_READ))]


def _find(session: Session, name: str, version: str) -> tuple[RegisteredModel, AdapterVersion]:
    model = models.get_by_name(session, name)
    return model, service.get_version(session, model, version)


def to_out(row: AdapterVersion, model: RegisteredModel) -> AdapterOut:
    manifest = service.manifest_of(row, model)
    base = f"/v1/models/{model.name}/adapters/{row.version}"
    return AdapterOut(
        **manifest,
        downloadable=row.status == PUBLISHED,
        archive={"sha256": row.archive_sha256, "bytes": row.archive_bytes, "format": "tar.gz"},
        links={"self": base, "download": f"{base}/download", "audit": f"{base}/audit"},
    )


@router.get("", response_model=AdapterList, summary="Every adapter version of a model")
def list_adapters(name: str, session: SessionDep, _: Reader) -> AdapterList:
    model = models.get_by_name(session, name)
    rows = service.list_versions(session, model)
    return AdapterList(
        items=[to_out(r, model) for r in rows], latest=service.latest_passing(session, model.id)
    )


@router.get(
    "/{version}",
    response_model=AdapterOut,
    summary="One version's manifest ('latest': the newest that passed its audit)",
)
def get_adapter(name: str, version: str, session: SessionDep, _: Reader) -> AdapterOut:
    model, row = _find(session, name, version)
    return to_out(row, model)


@router.get(
    "/{version}/download",
    summary="The adapter archive (tar.gz: PEFT files, manifest.json, audit.json)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}},
        304: {"description": "matches If-None-Match"},
        409: {"description": "the adapter failed its audit (quarantined)"},
    },
)
def download_adapter(
    name: str,
    version: str,
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require(Scope.ADAPTERS_DOWNLOAD))],
) -> Response:
    model, row = _find(session, name, version)
    if row.status != PUBLISHED:
        failed = [c["message"] for c in row.verdict.get("failed", [])]
        raise Problem(
            409,
            "adapter-quarantined",
            "Adapter failed its audit",
            f"version {row.version} of '{model.name}' failed its audit and cannot be "
            f"downloaded: {'; '.join(failed) or 'see its audit'}",
            version=row.version,
            failed_criteria=row.verdict.get("failed", []),
        )
    etag = f'"{row.archive_sha256}"'
    digest = base64.b64encode(bytes.fromhex(row.archive_sha256)).decode()
    headers = {
        "ETag": etag,
        # RFC 9530; the sha256 hex is also in the manifest and the ETag.
        "Repr-Digest": f"sha-256=:{digest}:",
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    trail.record(
        session,
        actor=principal.key_id,
        tenant_id=principal.tenant_id,
        event_type="adapter.downloaded",
        object_type="adapter_version",
        object_id=row.id,
        details={"model": model.name, "version": row.version, "sha256": row.archive_sha256},
    )
    session.commit()
    store = get_store()
    key = f"{row.storage_prefix}/{ARCHIVE}"
    headers["Content-Length"] = str(row.archive_bytes)
    headers["Content-Disposition"] = f'attachment; filename="{model.name}-v{row.version}.tar.gz"'
    return StreamingResponse(store.iter_bytes(key), media_type="application/gzip", headers=headers)


@router.get(
    "/{version}/audit",
    summary="The full audit: every metric before and after, thresholds, verdict, probes",
)
def get_audit(name: str, version: str, session: SessionDep, _: Auditor) -> dict[str, object]:
    model, row = _find(session, name, version)
    return {
        "model": model.name,
        "version": row.version,
        "status": row.status,
        **row.audit,
        "links": {
            "adapter": f"/v1/models/{model.name}/adapters/{row.version}",
            "html": f"/v1/models/{model.name}/adapters/{row.version}/audit.html",
        },
    }


@router.get(
    "/{version}/audit.html",
    response_class=HTMLResponse,
    summary="The audit as a self-contained report page for people",
)
def get_audit_html(name: str, version: str, session: SessionDep, _: Auditor) -> HTMLResponse:
    model, row = _find(session, name, version)
    return HTMLResponse(
        report.render(row.audit, service.manifest_of(row, model)),
        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
    )
