"""The dispatcher: turns pending requests into jobs, sends jobs to the workers, and
runs the periodic housekeeping (reaper, purge).

One tick:
1. batch: claim `received` requests (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite:
   BEGIN IMMEDIATE), group them per (model, method); a group becomes a job once its
   oldest request waited `batch_window_seconds` or it has `batch_max_requests`.
   Commit. Two dispatchers never see the same row, so no request lands in two jobs.
2. send: for queued jobs not yet sent (or sent long ago and still unclaimed), send
   the Celery task by name, then record `enqueued_at`. A broker that is down leaves the
   job unsent; the next tick tries again. Nothing is lost.
3. reap jobs whose worker went silent; purge raw data past retention.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from service.config import get_settings
from service.db import claim_rows, get_sessionmaker, session_scope, utcnow
from service.erasure_requests import service as requests_svc
from service.erasure_requests.models import ErasureRequest
from service.jobs import service as jobs
from service.jobs.models import Job
from service.queue import BrokerUnavailable, enqueue_job
from service.states import JobStage, RequestStatus
from service.trail import service as trail

log = structlog.get_logger()
ACTOR = "dispatcher"
_SCAN = 5000  # pending rows looked at per tick


@dataclass
class TickReport:
    jobs_created: list[str] = field(default_factory=list)
    jobs_sent: list[str] = field(default_factory=list)
    send_failures: int = 0
    reaped: int = 0
    purged: int = 0
    sealed: int = 0  # intake events chained into the trail


def batch_pending(
    session: Session, *, now: datetime | None = None, scan_limit: int = _SCAN
) -> list[str]:
    settings = get_settings()
    now = now or utcnow()
    q = (
        select(ErasureRequest)
        .where(ErasureRequest.status == RequestStatus.RECEIVED.value)
        .order_by(ErasureRequest.received_at, ErasureRequest.id)
        .limit(scan_limit)
    )
    q = claim_rows(q, session)
    groups: dict[tuple[str, str], list[ErasureRequest]] = defaultdict(list)
    for req in session.scalars(q):
        groups[(req.model_id, req.method_key)].append(req)

    window = timedelta(seconds=settings.batch_window_seconds)
    size = settings.batch_max_requests
    created: list[str] = []
    for (model_id, _), reqs in groups.items():
        while reqs:
            chunk = reqs[:size]
            if len(chunk) < size and now - chunk[0].received_at < window:
                break  # not full and not old enough: wait for more requests
            job = jobs.create(
                session,
                model_id=model_id,
                method=chunk[0].method_override,
                requests=chunk,
                actor=ACTOR,
            )
            created.append(job.id)
            reqs = reqs[size:]
    return created


def send_pending(
    session: Session, *, now: datetime | None = None, send: Callable[[str], None] = enqueue_job
) -> tuple[list[str], int]:
    """Send every queued job that was never sent, or sent too long ago and not claimed."""
    now = now or utcnow()
    resend_before = now - timedelta(seconds=get_settings().enqueue_resend_seconds)
    q = (
        select(Job)
        .where(
            Job.stage == JobStage.QUEUED.value,
            or_(Job.enqueued_at.is_(None), Job.enqueued_at < resend_before),
        )
        .order_by(Job.created_at)
        .limit(200)
    )
    q = claim_rows(q, session)
    sent: list[str] = []
    # One job per model at a time (versions form a chain), oldest first.
    busy = jobs.active_model_ids(session) | set(
        session.scalars(
            select(Job.model_id).where(
                Job.stage == JobStage.QUEUED.value, Job.enqueued_at >= resend_before
            )
        )
    )
    for job in session.scalars(q).all():
        if job.model_id in busy:
            continue
        busy.add(job.model_id)
        try:
            send(job.id)
        except BrokerUnavailable as exc:
            log.warning("broker_unavailable", job_id=job.id, error=str(exc))
            return sent, 1  # the broker is down: stop this tick, keep the rest for later
        job.enqueued_at = utcnow()
        sent.append(job.id)
    return sent, 0


def tick(
    factory: sessionmaker[Session] | None = None, *, now: datetime | None = None
) -> TickReport:
    factory = factory or get_sessionmaker()
    report = TickReport()
    with session_scope(factory) as session:
        report.sealed = trail.seal_pending(session)
    with session_scope(factory) as session:
        report.jobs_created = batch_pending(session, now=now)
    with session_scope(factory) as session:
        report.jobs_sent, report.send_failures = send_pending(session, now=now)
    with session_scope(factory) as session:
        report.reaped = len(jobs.reap(session, now=now))
    with session_scope(factory) as session:
        report.purged = requests_svc.purge_due(session, now=now)
    if report.jobs_created or report.jobs_sent or report.reaped or report.purged:
        log.info(
            "dispatch_tick",
            created=len(report.jobs_created),
            sent=len(report.jobs_sent),
            send_failures=report.send_failures,
            reaped=report.reaped,
            purged=report.purged,
        )
    return report


def run_forever(stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    interval = get_settings().dispatch_interval_seconds
    log.info("dispatcher_started", interval_s=interval)
    while not stop.is_set():
        try:
            tick()
        except Exception:  # a database hiccup must not kill the loop
            log.exception("dispatch_tick_failed")
        stop.wait(interval)
    log.info("dispatcher_stopped")
