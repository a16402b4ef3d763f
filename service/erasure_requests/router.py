from __future__ import annotations

import hashlib
from typing import Annotated

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from sqlalchemy.orm import Session

from service.access.scopes import Scope
from service.access.service import Principal
from service.config import get_settings
from service.deps import (
    SessionDep,
    TokenDep,
    authenticate,
    check_scope,
    raw_json_body,
    require,
    require_json,
    validate_body,
)
from service.erasure_requests import service
from service.erasure_requests.models import ErasureRequest
from service.erasure_requests.schemas import (
    ErasureRequestCreate,
    ErasureRequestOut,
    ErasureRequestPage,
    ItemDigests,
    RejectBody,
)
from service.errors import Problem
from service.models_registry.models import RegisteredModel
from service.states import REQUEST_CANCELABLE, RequestStatus

router = APIRouter(prefix="/v1/erasure-requests", tags=["erasure requests"])
MAX_IDEMPOTENCY_KEY = 255
Writer = Annotated[Principal, Depends(require(Scope.REQUESTS_WRITE))]
Reader = Annotated[Principal, Depends(require(Scope.REQUESTS_READ))]


def to_out(req: ErasureRequest, model_name: str) -> ErasureRequestOut:
    base = f"/v1/erasure-requests/{req.id}"
    links = {"self": base, "model": f"/v1/models/{model_name}"}
    if RequestStatus(req.status) in REQUEST_CANCELABLE:
        links["cancel"] = f"{base}/cancel"
    if req.job_id:
        links["job"] = f"/v1/jobs/{req.job_id}"
    if req.adapter_version is not None:
        adapter = f"/v1/models/{model_name}/adapters/{req.adapter_version}"
        links["adapter"] = adapter
        links["download"] = f"{adapter}/download"
    return ErasureRequestOut(
        id=req.id,
        status=req.status,
        status_reason=req.status_reason,
        model=model_name,
        subject_ref=service.subject_ref(req),
        item_count=req.item_count,
        holdout_count=req.holdout_count,
        item_digests=ItemDigests(
            salt=req.item_salt, items=req.item_hashes, holdout=req.holdout_hashes
        ),
        method=req.method_override,
        received_at=req.received_at,
        due_at=req.due_at,
        queued_at=req.queued_at,
        started_at=req.started_at,
        finished_at=req.finished_at,
        job_id=req.job_id,
        adapter_version=req.adapter_version,
        data_purged_at=req.data_purged_at,
        links=links,
    )


def _out(session: SessionDep, req: ErasureRequest) -> ErasureRequestOut:
    model = session.get(RegisteredModel, req.model_id)
    return to_out(req, model.name if model else req.model_id)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ErasureRequestOut,
    dependencies=[Depends(require_json)],
    openapi_extra=raw_json_body(ErasureRequestCreate),
    summary="Submit an erasure request (idempotent per Idempotency-Key)",
    responses={
        409: {"description": "same key still being written"},
        422: {"description": "invalid body, or key reused with another body"},
    },
)
async def submit(
    request: Request,
    token: TokenDep,
    session: SessionDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", description="a fresh UUID per request")
    ] = None,
) -> Response:
    # The hot path: the key check, the body and the intake in one threadpool hop and one
    # transaction (a dependency would cost a hop, a pool checkout and a commit more).
    # The handler reads the body itself so that it is judged after the key: an unknown
    # key learns nothing about its body.
    raw = await request.body()
    return await to_thread.run_sync(
        _submit, session, token, raw, idempotency_key, limiter=_intake_limiter(request)
    )


def _intake_limiter(request: Request) -> CapacityLimiter:
    # Its own few threads (INTAKE_CONCURRENCY), not the shared pool of 40: submits are
    # CPU-bound under the GIL, and 40 of them at once only trade it back and forth. One
    # per app, made on its event loop.
    state = request.app.state
    if getattr(state, "intake_limiter", None) is None:
        state.intake_limiter = CapacityLimiter(get_settings().intake_concurrency)
    limiter: CapacityLimiter = state.intake_limiter
    return limiter


def _submit(session: Session, token: str, raw: bytes, idempotency_key: str | None) -> Response:
    principal = authenticate(session, token)
    check_scope(principal, Scope.REQUESTS_WRITE)
    body = validate_body(ErasureRequestCreate, raw)
    if not idempotency_key or not idempotency_key.strip():
        raise Problem(
            400,
            "idempotency-key-required",
            "Idempotency-Key required",
            "send an Idempotency-Key header (a fresh UUID per request) so that a retry "
            "never files the same erasure twice",
        )
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise Problem(
            422,
            "validation-error",
            "The request is not valid",
            f"header Idempotency-Key: at most {MAX_IDEMPOTENCY_KEY} characters",
            errors=[
                {
                    "field": "header.Idempotency-Key",
                    "message": f"at most {MAX_IDEMPOTENCY_KEY} characters",
                    "type": "string_too_long",
                }
            ],
        )
    result = service.submit(
        session, principal=principal, body=body, idempotency_key=idempotency_key.strip()
    )
    out = to_out(result.request, body.model)
    session.commit()
    headers = {"Location": out.links["self"]}
    if not result.created:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        out.model_dump_json(), status_code=202, media_type="application/json", headers=headers
    )


@router.get("", response_model=ErasureRequestPage, summary="List your erasure requests")
def list_requests(
    session: SessionDep,
    principal: Reader,
    status_: Annotated[RequestStatus | None, Query(alias="status")] = None,
    model: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ErasureRequestPage:
    rows, next_cursor = service.list_for(
        session, principal=principal, status=status_, model=model, cursor=cursor, limit=limit
    )
    names = {m.id: m.name for m in session.query(RegisteredModel).all()} if rows else {}
    return ErasureRequestPage(
        items=[to_out(r, names.get(r.model_id, r.model_id)) for r in rows],
        next_cursor=next_cursor,
    )


@router.get(
    "/{request_id}",
    response_model=ErasureRequestOut,
    summary="One erasure request (ETag; If-None-Match gives 304)",
    responses={304: {"description": "not modified"}},
)
def get_request(
    request_id: str, request: Request, session: SessionDep, principal: Reader
) -> Response:
    out = _out(session, service.get_for(session, principal=principal, request_id=request_id))
    body = out.model_dump_json().encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    inm = request.headers.get("if-none-match", "")
    if etag in [t.strip().removeprefix("W/") for t in inm.split(",")] or inm.strip() == "*":
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.post(
    "/{request_id}/cancel",
    response_model=ErasureRequestOut,
    summary="Cancel a request before training starts (409 afterwards)",
)
def cancel(request_id: str, session: SessionDep, principal: Writer) -> ErasureRequestOut:
    req = service.cancel(session, principal=principal, request_id=request_id)
    out = _out(session, req)
    session.commit()
    return out


@router.post(
    "/{request_id}/reject",
    response_model=ErasureRequestOut,
    dependencies=[Depends(require_json)],
    summary="Refuse a request before training starts (admin; 409 afterwards)",
)
def reject(
    request_id: str,
    body: RejectBody,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
) -> ErasureRequestOut:
    req = service.reject(session, principal=principal, request_id=request_id, reason=body.reason)
    out = _out(session, req)
    session.commit()
    return out


@router.get(
    "/{request_id}/audit",
    summary="The audit of the adapter version that handled this request, for its own items",
)
def get_request_audit(
    request_id: str,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require(Scope.AUDIT_READ))],
) -> dict[str, object]:
    from service.adapters import service as adapters  # adapters -> jobs -> this package

    req = service.get_for(session, principal=principal, request_id=request_id)
    row = adapters.for_job(session, req.job_id) if req.job_id else None
    if row is None or (req.adapter_version is not None and row.version != req.adapter_version):
        raise Problem(
            404,
            "no-audit-yet",
            "No audit yet",
            f"the request is {req.status}; its audit exists once its adapter was audited "
            "(status completed, or failed by the audit)",
        )
    model = session.get(RegisteredModel, req.model_id)
    model_name = model.name if model else req.model_id
    digests = req.item_hashes
    items = [
        {**item, "digest": digests[item["index"]] if item["index"] < len(digests) else None}
        for item in row.audit.get("items", [])
        if item.get("request_id") == req.id and item.get("set") == "forget"
    ]
    return {
        "request_id": req.id,
        "model": model_name,
        "version": row.version,
        "status": row.status,
        "verdict": {
            "passed": row.verdict["passed"],
            "failed": [c["message"] for c in row.verdict.get("failed", [])],
        },
        "item_digest_salt": req.item_salt,
        "items": items,
        "links": {
            "adapter_audit": f"/v1/models/{model_name}/adapters/{row.version}/audit",
        },
    }
