"""Sending work to the Celery workers, by task name: the gateway never imports the
worker code (nor torch). The names here are the contract with workers/celery_app.py."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from celery import Celery

from service.config import get_settings

TASK_RUN_JOB = "unlearn.run_job"
TASK_DISPATCH_TICK = "unlearn.dispatch_tick"
QUEUE_UNLEARNING = "unlearning"  # GPU workers only
QUEUE_DEFAULT = "default"  # light tasks


class BrokerUnavailable(Exception):
    pass


def _transport_options(broker_url: str) -> dict[str, object]:
    if broker_url.startswith("redis"):
        return {"max_retries": 0, "socket_connect_timeout": 3, "socket_timeout": 10}
    if broker_url.startswith("sqla+sqlite:///"):
        # The embedded broker is a SQLite file: make sure its folder exists.
        Path(broker_url.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return {}  # other transports pass these options on (SQLAlchemy: to create_engine)


@lru_cache
def producer() -> Celery:
    broker_url = get_settings().broker_url
    app = Celery("unlearn-gateway", broker=broker_url)
    # Fail fast: the dispatcher keeps the row and retries on its next tick, so a
    # blocking retry loop here would only stall it.
    app.conf.broker_connection_timeout = 3
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_transport_options = _transport_options(broker_url)
    app.conf.task_serializer = "json"
    return app


def enqueue_job(job_id: str) -> None:
    try:
        producer().send_task(
            TASK_RUN_JOB,
            args=[job_id],
            queue=QUEUE_UNLEARNING,
            retry=False,
            task_id=f"job-{job_id}",
        )
    except Exception as exc:  # kombu/redis raise many types; all mean "not sent"
        raise BrokerUnavailable(str(exc)) from exc


def broker_reachable(timeout: float = 2.0) -> bool:
    try:
        with producer().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:
        return False
