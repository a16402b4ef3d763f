"""The dispatcher against real PostgreSQL and real Redis: concurrent dispatchers,
a broker that is down, and the message that reaches the queue."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
from kombu import Connection
from sqlalchemy import select

from service import dispatcher, queue
from service.db import session_scope
from service.erasure_requests.models import ErasureRequest
from service.jobs.models import Job
from service.trail.models import AuditEvent
from tests.conftest import REDIS_URL
from tests.service import factories as f


@pytest.fixture
def redis_queue():
    """The real `unlearning` queue on the test Redis database, emptied around the test."""
    with Connection(REDIS_URL) as conn:
        conn.default_channel.queue_purge(queue.QUEUE_UNLEARNING)
    yield
    with Connection(REDIS_URL) as conn:
        conn.default_channel.queue_purge(queue.QUEUE_UNLEARNING)


def _drain(n_max: int = 1000) -> list[dict]:
    out = []
    with Connection(REDIS_URL) as conn:
        q = conn.SimpleQueue(queue.QUEUE_UNLEARNING, no_ack=True)
        try:
            while len(out) < n_max:
                try:
                    msg = q.get(block=True, timeout=0.5)
                except q.Empty:
                    break
                out.append({"headers": msg.headers, "body": msg.decode()})
        finally:
            q.close()
    return out


def test_two_dispatchers_never_put_a_request_into_two_jobs(live_db, settings):
    settings.batch_max_requests = 3
    with session_scope(live_db) as s:
        who = f.principal(s)
        f.model(s)
        f.requests(s, who, 120, "support")

    barrier = threading.Barrier(2)
    created: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        try:
            barrier.wait()
            for _ in range(40):
                with session_scope(live_db) as s:
                    # Small scans so that both dispatchers compete for the same rows.
                    created[slot] += dispatcher.batch_pending(s, scan_limit=6)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert created[0] and created[1], "both dispatchers should have made jobs"

    with session_scope(live_db) as s:
        reqs = s.scalars(select(ErasureRequest)).all()
        assert {r.status for r in reqs} == {"queued"}
        assert len({r.job_id for r in reqs}) == 40
        # The trail records each job's requests: across all jobs, no request twice.
        listed = [
            rid
            for e in s.scalars(select(AuditEvent).where(AuditEvent.event_type == "job.created"))
            for rid in e.details["requests"]
        ]
        assert len(listed) == 120 and len(set(listed)) == 120
        queued_events = Counter(
            e.object_id
            for e in s.scalars(
                select(AuditEvent).where(AuditEvent.event_type == "erasure_request.queued")
            )
        )
        assert set(queued_events.values()) == {1}


def test_broker_down_loses_nothing_and_the_next_tick_sends(live_db, settings, redis_queue):
    with session_scope(live_db) as s:
        who = f.principal(s)
        f.model(s)
        reqs = f.requests(s, who, 2, "support")

    settings.broker_url = "redis://127.0.0.1:1/0"  # nothing listens there
    queue.producer.cache_clear()
    try:
        report = dispatcher.tick(live_db)
    finally:
        settings.broker_url = REDIS_URL
        queue.producer.cache_clear()
    assert len(report.jobs_created) == 1 and report.jobs_sent == [] and report.send_failures == 1
    with session_scope(live_db) as s:
        job = s.get(Job, report.jobs_created[0])
        assert job.stage == "queued" and job.enqueued_at is None
        assert {s.get(ErasureRequest, r.id).status for r in reqs} == {"queued"}

    again = dispatcher.tick(live_db)
    assert again.jobs_created == [] and again.jobs_sent == report.jobs_created
    [message] = _drain()
    assert message["headers"]["task"] == queue.TASK_RUN_JOB
    args = (
        message["body"][0] if isinstance(message["body"], list) else json.loads(message["body"])[0]
    )
    assert args == [report.jobs_created[0]]
    # Sent once: a third tick sends nothing new.
    assert dispatcher.tick(live_db).jobs_sent == []


def test_unclaimed_job_is_sent_again_after_the_resend_delay(live_db, settings, redis_queue):
    from datetime import timedelta

    from service.db import utcnow

    settings.enqueue_resend_seconds = 60
    with session_scope(live_db) as s:
        who = f.principal(s)
        f.model(s)
        f.requests(s, who, 1, "support")
    first = dispatcher.tick(live_db)
    assert len(first.jobs_sent) == 1
    assert dispatcher.tick(live_db, now=utcnow() + timedelta(seconds=30)).jobs_sent == []
    resent = dispatcher.tick(live_db, now=utcnow() + timedelta(seconds=90))
    assert resent.jobs_sent == first.jobs_sent
    assert len(_drain()) == 2  # a duplicate message is harmless: claiming is idempotent
