"""The Celery application of the workers, configured for long, single-GPU jobs.

Why each setting is what it is: docs/workers.md. Start a GPU worker with
`unlearn worker` (one process per GPU, queue `unlearning`).
"""

from __future__ import annotations

from celery import Celery

from service.config import get_settings
from service.queue import QUEUE_DEFAULT, QUEUE_UNLEARNING, TASK_RUN_JOB


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("unlearn-worker", broker=settings.broker_url, include=["workers.tasks"])
    transport: dict[str, object] = {}
    if settings.broker_url.startswith(("redis", "rediss")):
        transport = {
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 30,
        }
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a broker restart
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the database, not in a backend
        task_default_queue=QUEUE_DEFAULT,
        task_routes={TASK_RUN_JOB: {"queue": QUEUE_UNLEARNING}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        task_soft_time_limit=settings.job_soft_time_limit_seconds,
        task_time_limit=settings.job_time_limit_seconds,
        # Keep a running job going while the broker reconnects: the database, not the
        # broker, says who owns the job, and a redelivered copy is refused by the claim.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts_level="INFO",  # our structured logs go to stdout
        # Events for Flower; the embedded (SQLAlchemy) transport has no fan-out for them.
        worker_send_task_events=not settings.broker_url.startswith("sqla"),
        task_send_sent_event=not settings.broker_url.startswith("sqla"),
    )
    return app


app = make_app()
