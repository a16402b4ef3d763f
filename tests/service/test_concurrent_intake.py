"""Intake under real concurrency: a uvicorn server (2 worker processes) on PostgreSQL,
hit by many simultaneous clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select, text

from service import dispatcher
from service.access import service as access
from service.access.scopes import ALL_SCOPES, DEFAULT_CLIENT_SCOPES
from service.db import session_scope
from service.erasure_requests.models import ErasureRequest
from service.models_registry import service as registry
from service.models_registry.schemas import ModelCreate
from service.ports import free_port
from tests.conftest import TABLES, qa_body


@pytest.fixture
def server(live_db) -> Iterator[tuple[str, str, str]]:
    with session_scope(live_db) as s:
        token = access.mint_key(s, tenant_name="acme", scopes=DEFAULT_CLIENT_SCOPES, name="x").token
        admin = access.mint_key(s, tenant_name="ops", scopes=ALL_SCOPES, name="adm").token
        registry.register(s, spec=ModelCreate(name="support"), actor="test")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.main:create_app",
            "--factory",
            "--port",
            str(port),
            "--workers",
            "2",
            "--log-level",
            "warning",
        ],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # so the teardown can stop the workers too
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("uvicorn did not start: " + proc.stderr.read().decode()[-2000:])
    try:
        yield url, token, admin
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _post_many(
    url: str, token: str, bodies_keys: list[tuple[dict, str]]
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies_keys))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *[
                client.post(
                    "/v1/erasure-requests",
                    json=body,
                    headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
                )
                for body, key in bodies_keys
            ]
        )


def test_500_concurrent_posts_give_500_requests_each_in_one_job(server, live_db, settings):
    url, token, _ = server
    work = [(qa_body(subject=f"s{i}", n=1), uuid.uuid4().hex) for i in range(500)]
    responses = asyncio.run(_post_many(url, token, work))
    assert [r.status_code for r in responses] == [202] * 500
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 500

    settings.batch_max_requests = 16
    with session_scope(live_db) as s:
        created = dispatcher.batch_pending(s)
    assert len(created) == 32  # ceil(500 / 16)
    with session_scope(live_db) as s:
        rows = s.scalars(select(ErasureRequest)).all()
        assert {r.id for r in rows} == ids
        assert all(r.job_id is not None and r.status == "queued" for r in rows)
        per_job = s.execute(
            select(ErasureRequest.job_id, func.count()).group_by(ErasureRequest.job_id)
        ).all()
        assert sum(n for _, n in per_job) == 500 and max(n for _, n in per_job) == 16


def test_concurrent_posts_with_one_key_make_one_request(server, live_db):
    url, token, _ = server
    body = qa_body(subject="dup", n=1)
    responses = asyncio.run(_post_many(url, token, [(body, "one-key")] * 20))
    codes = {r.status_code for r in responses}
    assert codes <= {202, 409}, [r.text for r in responses if r.status_code not in (202, 409)]
    ids = {r.json()["id"] for r in responses if r.status_code == 202}
    assert len(ids) == 1
    for r in responses:
        if r.status_code == 409:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["retry-after"] == "1"
    with session_scope(live_db) as s:
        assert s.scalar(select(func.count()).select_from(ErasureRequest)) == 1


def test_no_forget_item_is_stored_in_plain_text(server, live_db):
    url, token, _ = server
    secret_answer = "Lives at 4821 Quetzal Lane, phone 555-0199-7731"
    body = {
        "model": "support",
        "subject_ref": "subject-zz-9183",
        "items": [
            {"prompt": "Where does Wilhelmina Okonkwo-Larsen live?", "completion": secret_answer},
            {"text": "Wilhelmina Okonkwo-Larsen was born on 3 March 1979 in Tromsø."},
        ],
        "holdout": [{"prompt": "Where does Bartholomew Ng live?", "completion": "9 Birch Rd"}],
    }
    r = httpx.post(
        f"{url}/v1/erasure-requests",
        json=body,
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "pt"},
    )
    assert r.status_code == 202
    with session_scope(live_db) as s:
        dispatcher.batch_pending(s)
    needles = [
        "Okonkwo",
        "Quetzal",
        "555-0199",
        "Tromsø",
        "Troms\\u00f8",
        "Bartholomew",
        "subject-zz-9183",
    ]
    with session_scope(live_db) as s:
        for table in TABLES:
            dump = "\n".join(s.scalars(text(f"SELECT t::text FROM {table} t")).all())
            for needle in needles:
                assert needle not in dump, f"{needle!r} in plain text in {table}"
                assert needle.encode().hex() not in dump, f"{needle!r} as bytea in {table}"


def test_intake_does_not_wait_for_the_chains_lock(server, live_db):
    """Intake records its trail event as pending, so a transaction holding the chain's
    lock (a long append elsewhere) does not hold submissions up; the event is chained by
    the next append, before any later event of the same request."""
    from service.db import get_engine
    from service.trail import service as trail
    from service.trail.models import AuditEvent, PendingEvent

    url, token, _ = server
    headers = {"Authorization": f"Bearer {token}"}
    with get_engine().connect() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": trail._LOCK_KEY})
        t = time.monotonic()
        r = httpx.post(
            f"{url}/v1/erasure-requests",
            json=qa_body(),
            headers=headers | {"Idempotency-Key": "no-wait"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        assert time.monotonic() - t < 5  # it did not wait for the lock
        holder.rollback()  # releases the lock
    rid = r.json()["id"]
    with session_scope(live_db) as s:
        assert s.scalar(select(PendingEvent.object_id)) == rid
        assert s.scalar(select(AuditEvent.seq).where(AuditEvent.object_id == rid)) is None
    r = httpx.post(f"{url}/v1/erasure-requests/{rid}/cancel", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    with session_scope(live_db) as s:
        assert s.scalar(select(PendingEvent.id)) is None  # the cancel's append chained it
        types = s.scalars(
            select(AuditEvent.event_type)
            .where(AuditEvent.object_id == rid)
            .order_by(AuditEvent.seq)
        ).all()
        assert types[:2] == ["erasure_request.received", "erasure_request.canceled"]
        assert trail.verify(s).ok
