"""Jobs: creation by the dispatcher, the worker-side lifecycle (claim, heartbeat,
advance, complete, fail), cancellation and the reaper. Functions never commit.

A request's status follows its job's stage (states.REQUEST_STATUS_FOR_STAGE); requests
already in a terminal status (a client canceled one while queued) are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.access.service import Principal
from service.config import get_settings
from service.db import claim_rows, is_postgres, is_uuid, utcnow
from service.erasure_requests import service as requests_svc
from service.erasure_requests.models import ErasureRequest
from service.errors import not_found
from service.jobs.models import Job
from service.states import (
    JOB_ACTIVE,
    JOB_TERMINAL,
    REQUEST_STATUS_FOR_STAGE,
    REQUEST_TERMINAL,
    JobStage,
    RequestStatus,
)
from service.trail import service as trail

J = JobStage


def requests_of(session: Session, job_id: str) -> list[ErasureRequest]:
    return list(
        session.scalars(
            select(ErasureRequest)
            .where(ErasureRequest.job_id == job_id)
            .order_by(ErasureRequest.received_at, ErasureRequest.id)
        )
    )


def live_requests(session: Session, job_id: str) -> list[ErasureRequest]:
    return [
        r for r in requests_of(session, job_id) if RequestStatus(r.status) not in REQUEST_TERMINAL
    ]


def create(
    session: Session,
    *,
    model_id: str,
    method: dict | None,
    requests: list[ErasureRequest],
    actor: str,
) -> Job:
    job = Job(
        model_id=model_id,
        method=method,
        stage=J.QUEUED.value,
        max_attempts=get_settings().job_max_attempts,
    )
    session.add(job)
    session.flush()
    trail.record(
        session,
        actor=actor,
        event_type="job.created",
        object_type="job",
        object_id=job.id,
        details={"model_id": model_id, "requests": [r.id for r in requests]},
    )
    for req in requests:
        req.job_id = job.id
        requests_svc.set_status(
            session, req, RequestStatus.QUEUED, actor=actor, extra={"job_id": job.id}
        )
    return job


def get_for(
    session: Session, *, principal: Principal, job_id: str
) -> tuple[Job, list[ErasureRequest]]:
    """A job and the requests in it that the caller may see (admin: all)."""
    job = session.get(Job, job_id) if is_uuid(job_id) else None
    if job is None:
        raise not_found("job", job_id)
    reqs = requests_of(session, job_id)
    if not principal.is_admin:
        reqs = [r for r in reqs if r.tenant_id == principal.tenant_id]
        if not reqs:
            raise not_found("job", job_id)
    return job, reqs


def advance(
    session: Session,
    job: Job,
    stage: JobStage,
    *,
    actor: str,
    reason: str | None = None,
    adapter_version: int | None = None,
) -> None:
    """Move a job (guarded by states.JOB_TRANSITIONS) and its live requests with it."""
    before = job.stage
    job.stage = stage.value
    now = utcnow()
    if stage in (J.SUCCEEDED, J.FAILED, J.CANCELED):
        job.finished_at = now
    if stage is J.SUCCEEDED:
        job.progress = 1.0
    if stage is J.FAILED and reason:
        job.error = reason[:2000]
    trail.record(
        session,
        actor=actor,
        event_type=f"job.{stage.value}",
        object_type="job",
        object_id=job.id,
        details={"from": before, "to": stage.value},
    )
    target = REQUEST_STATUS_FOR_STAGE[stage]
    for req in live_requests(session, job.id):
        if stage is J.SUCCEEDED:
            req.adapter_version = adapter_version
        requests_svc.set_status(
            session,
            req,
            target,
            actor=actor,
            reason=reason if stage is J.FAILED else None,
            extra={
                "job_id": job.id,
                **({"adapter_version": adapter_version} if adapter_version is not None else {}),
            },
        )


def active_model_ids(session: Session) -> set[str]:
    return set(
        session.scalars(
            select(Job.model_id).where(Job.stage.in_([s.value for s in JOB_ACTIVE])).distinct()
        )
    )


def busy_with_model(session: Session, job: Job) -> bool:
    """Another job of the same model is running."""
    return (
        session.scalar(
            select(Job.id)
            .where(
                Job.model_id == job.model_id,
                Job.id != job.id,
                Job.stage.in_([s.value for s in JOB_ACTIVE]),
            )
            .limit(1)
        )
        is not None
    )


def claim(session: Session, *, job_id: str, worker_id: str) -> Job | None:
    """Take a queued job for one worker. A redelivered or duplicate task finds it
    already claimed (or finished) and gets None."""
    q = select(Job).where(Job.id == job_id, Job.stage == J.QUEUED.value)
    # Wait for the lock rather than skip it: the dispatcher may still hold the row for
    # the moment between sending this task and committing `enqueued_at`.
    job = session.scalar(q.with_for_update() if is_postgres(session) else q)
    if job is None:
        return None
    if not live_requests(session, job.id):
        advance(session, job, J.CANCELED, actor=worker_id)
        return None
    if busy_with_model(session, job):
        # Versions of a model form a chain: one job per model at a time. The dispatcher
        # sends this one again once the other is done.
        job.enqueued_at = None
        return None
    from service.adapters.service import latest_passing  # adapters imports this module

    # Train from the newest passing version (part of the work folder's name, so a
    # resumed run only reuses a checkpoint made from the same parent).
    job.parent_version = latest_passing(session, job.model_id)
    now = utcnow()
    job.attempts += 1
    job.worker_id = worker_id
    job.started_at = job.started_at or now
    job.heartbeat_at = now
    job.error = None
    advance(session, job, J.PREPARING, actor=worker_id)
    return job


def lock(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id, with_for_update=is_postgres(session))


class NotOwned(Exception):
    """The job was taken from this worker (canceled, reaped, restarted)."""


@dataclass(frozen=True)
class Beat:
    stage: JobStage
    ours: bool  # still this worker's, in an active stage


def heartbeat(
    session: Session, *, job_id: str, worker_id: str, progress: float | None = None
) -> Beat:
    """Record liveness and progress; tells the worker whether the job is still its own,
    so it notices a cancel or a reap between two steps."""
    job = lock(session, job_id)
    if job is None:
        raise not_found("job", job_id)
    ours = job.worker_id == worker_id and JobStage(job.stage) in JOB_ACTIVE
    if ours:
        job.heartbeat_at = utcnow()
        if progress is not None:
            job.progress = round(min(1.0, max(0.0, progress)), 4)
    return Beat(JobStage(job.stage), ours)


def own(session: Session, *, job_id: str, worker_id: str) -> Job:
    """The job, locked, if it is still this worker's and active; else NotOwned."""
    job = lock(session, job_id)
    if job is None or job.worker_id != worker_id or JobStage(job.stage) not in JOB_ACTIVE:
        state = f"{job.stage} with {job.worker_id}" if job else "gone"
        raise NotOwned(f"job {job_id} is {state}, no longer {worker_id}'s")
    job.heartbeat_at = utcnow()
    return job


def advance_own(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    stage: JobStage,
    progress: float | None = None,
    reason: str | None = None,
) -> Job:
    """A worker moves its own job on; NotOwned if the job is no longer its own."""
    job = own(session, job_id=job_id, worker_id=worker_id)
    if progress is not None:
        job.progress = round(min(1.0, max(0.0, progress)), 4)
    advance(session, job, stage, actor=worker_id, reason=reason)
    return job


def request_withdrawn(session: Session, job: Job, *, actor: str) -> None:
    """One of the job's requests was canceled or rejected (job row locked by the caller).
    A job with no live request left is canceled; a running one restarts without it, so
    the withdrawn data is not trained on (a queued one simply runs without it)."""
    stage = JobStage(job.stage)
    if stage in JOB_TERMINAL:
        return
    if not live_requests(session, job.id):
        advance(session, job, J.CANCELED, actor=actor)
    elif stage in JOB_ACTIVE:
        requeue(
            session,
            job,
            actor=actor,
            reason="restarted without a withdrawn request",
            count_attempt=False,
        )


def requeue(
    session: Session, job: Job, *, actor: str, reason: str, count_attempt: bool = True
) -> None:
    """Back to the queue for the dispatcher to send again. `count_attempt=False` when the
    restart is not the job's fault (a withdrawn request, a newer parent version)."""
    if not count_attempt:
        job.attempts = max(0, job.attempts - 1)  # the next claim counts it again
    job.worker_id = None
    job.enqueued_at = None  # the dispatcher sends it again
    job.error = reason[:2000]
    job.progress = 0.0
    advance(session, job, J.QUEUED, actor=actor)


@dataclass
class Reaped:
    job_id: str
    action: str  # "requeued" or "failed"


def reap(session: Session, *, now: datetime | None = None, actor: str = "reaper") -> list[Reaped]:
    """Jobs whose worker went silent: back to the queue, or failed after max attempts."""
    settings = get_settings()
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout_seconds)
    q = claim_rows(
        select(Job).where(Job.stage.in_([s.value for s in JOB_ACTIVE]), Job.heartbeat_at < cutoff),
        session,
    )
    out: list[Reaped] = []
    for job in session.scalars(q).all():
        silent = (
            f"worker {job.worker_id} sent no heartbeat since {job.heartbeat_at:%Y-%m-%dT%H:%M:%SZ}"
        )
        if job.attempts >= job.max_attempts:
            advance(
                session,
                job,
                J.FAILED,
                actor=actor,
                reason=f"gave up after {job.attempts} attempts: {silent}; resubmit the "
                "requests or ask an operator to check the workers",
            )
            out.append(Reaped(job.id, "failed"))
        else:
            requeue(session, job, actor=actor, reason=f"attempt {job.attempts} lost: {silent}")
            out.append(Reaped(job.id, "requeued"))
    return out
