from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.access.scopes import Scope
from service.access.service import Principal
from service.adapters.service import for_job
from service.deps import SessionDep, require
from service.jobs import service
from service.jobs.schemas import JobOut
from service.models_registry.models import RegisteredModel

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobOut, summary="One unlearning job's progress")
def get_job(
    job_id: str,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require(Scope.REQUESTS_READ))],
) -> JobOut:
    job, reqs = service.get_for(session, principal=principal, job_id=job_id)
    model = session.get(RegisteredModel, job.model_id)
    version = for_job(session, job.id)
    return JobOut(
        id=job.id,
        model=model.name if model else job.model_id,
        stage=job.stage,
        progress=job.progress,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        requests=[r.id for r in reqs],
        method=job.method,
        parent_version=job.parent_version,
        adapter_version=version.version if version else None,
        audit_rounds=job.audit_rounds,
        created_at=job.created_at,
        enqueued_at=job.enqueued_at,
        started_at=job.started_at,
        heartbeat_at=job.heartbeat_at,
        finished_at=job.finished_at,
        error=job.error,
        links={"self": f"/v1/jobs/{job.id}", "model": f"/v1/models/{model.name if model else ''}"},
    )
