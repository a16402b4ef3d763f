"""Celery tasks: ids in, a plain function does the work."""

from __future__ import annotations

import os
import socket

from celery import Task

from service.queue import TASK_DISPATCH_TICK, TASK_RUN_JOB
from workers import pipeline
from workers.celery_app import app


def worker_identity(task_id: str | None) -> str:
    # Fits the trail's 64-character actor column; unique per process and task.
    host = socket.gethostname()[:24]
    return f"w:{host}:{os.getpid()}:{(task_id or '-')[-12:]}"


@app.task(
    name=TASK_RUN_JOB,
    bind=True,
    # Only failures before the job was claimed come here (the database was unreachable):
    # nothing was taken, so the task simply tries again later.
    autoretry_for=(pipeline.NotClaimedYet,),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=8,
)
def run_job(self: Task, job_id: str) -> str:
    return pipeline.run(job_id, worker_id=worker_identity(self.request.id))


@app.task(name=TASK_DISPATCH_TICK, ignore_result=True)
def dispatch_tick() -> None:
    """The dispatcher's work as a light task, for deployments that schedule it with
    `celery beat` instead of running `unlearn dispatcher`."""
    from service.dispatcher import tick

    tick()
