from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from service.access.scopes import Scope
from service.access.service import Principal
from service.deps import SessionDep, require
from service.trail import service
from service.trail.models import AuditEvent
from service.trail.schemas import AuditEventOut, AuditEventPage, VerifyOut

router = APIRouter(prefix="/v1/audit", tags=["audit trail"])
Auditor = Annotated[Principal, Depends(require(Scope.AUDIT_READ))]


@router.get("/events", response_model=AuditEventPage, summary="The trail, oldest first")
def list_events(
    session: SessionDep,
    principal: Auditor,
    cursor: Annotated[int | None, Query(ge=0, description="seq to start after")] = None,
    object_id: Annotated[str | None, Query(max_length=64, pattern=r"^[\w.:-]+$")] = None,
    event_type: Annotated[str | None, Query(max_length=64, pattern=r"^[\w.]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditEventPage:
    _seal(session)
    q = select(AuditEvent)
    if not principal.is_admin:  # a tenant sees its own events; admins see all
        q = q.where(AuditEvent.tenant_id == principal.tenant_id)
    if cursor is not None:
        q = q.where(AuditEvent.seq > cursor)
    if object_id:
        q = q.where(AuditEvent.object_id == object_id)
    if event_type:
        q = q.where(AuditEvent.event_type == event_type)
    rows = list(session.scalars(q.order_by(AuditEvent.seq).limit(limit + 1)))
    page = rows[:limit]
    return AuditEventPage(
        items=[AuditEventOut.model_validate(r, from_attributes=True) for r in page],
        next_cursor=page[-1].seq if len(rows) > limit else None,
    )


@router.get("/verify", response_model=VerifyOut, summary="Recompute the whole hash chain")
def verify(session: SessionDep, _: Auditor) -> VerifyOut:
    _seal(session)
    result = service.verify(session)
    return VerifyOut(**result.__dict__)


def _seal(session: SessionDep) -> None:
    """Chain the intake's pending events first, so a reader sees everything recorded."""
    if service.seal_pending(session):
        session.commit()
