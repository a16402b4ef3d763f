"""Embedded mode (SQLite database, SQLite-backed broker): the same guarantees as on
PostgreSQL, and the CLI + API working end to end as a newcomer would run them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
from alembic import command
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from service import dispatcher
from service.cli import _alembic_config
from service.db import make_engine, session_scope
from service.erasure_requests.models import ErasureRequest
from service.ports import free_port
from service.trail import service as trail
from service.trail.models import AuditEvent
from tests.service import factories as f


@pytest.fixture
def sqlite_factory(tmp_path):
    url = f"sqlite:///{tmp_path / 'embedded.sqlite'}"
    cfg = _alembic_config()
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "head")
    engine = make_engine(url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def test_two_dispatchers_on_sqlite_never_share_a_request(sqlite_factory, settings):
    settings.batch_max_requests = 3
    with session_scope(sqlite_factory) as s:
        who = f.principal(s)
        f.model(s)
        f.requests(s, who, 60)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            for _ in range(15):
                with session_scope(sqlite_factory) as s:
                    dispatcher.batch_pending(s, scan_limit=6)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with session_scope(sqlite_factory) as s:
        assert {r.status for r in s.scalars(select(ErasureRequest))} == {"queued"}
        queued = Counter(
            e.object_id
            for e in s.scalars(
                select(AuditEvent).where(AuditEvent.event_type == "erasure_request.queued")
            )
        )
        assert len(queued) == 60 and set(queued.values()) == {1}
        assert trail.verify(s).ok


def _embedded_env() -> dict[str, str]:
    """This environment without the test suite's database, broker and key settings: the
    CLI falls back to its embedded defaults, as on a newcomer's machine."""
    skip = ("DATABASE_URL", "BROKER_URL", "DATA_ENCRYPTION_KEY", "ENVIRONMENT")
    return {k: v for k, v in os.environ.items() if k not in skip} | {"PYTHONPATH": os.getcwd()}


def _run(env: dict, cwd, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_and_api_end_to_end_on_the_embedded_defaults(tmp_path):
    env = _embedded_env()
    workdir = tmp_path / "fresh"
    workdir.mkdir()

    # The defaults (./var) are relative to the working directory: run from a fresh one.
    admin = _run(env, workdir, "migrate").strip().splitlines()[-1]
    assert admin.startswith("ulk_")
    assert (workdir / "var" / "unlearn.sqlite").exists()

    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api", "--port", str(port)],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        h = {"Authorization": f"Bearer {admin}"}
        assert httpx.get(f"{base}/readyz", timeout=10).json()["checks"] == {
            "database": True,
            "broker": True,
        }
        r = httpx.post(f"{base}/v1/models", json={"name": "support"}, headers=h)
        assert r.status_code == 201, r.text
        body = {
            "model": "support",
            "subject_ref": "p1",
            "items": [{"prompt": "Who is Ann?", "completion": "Ann is a baker"}],
        }
        r = httpx.post(
            f"{base}/v1/erasure-requests", json=body, headers=h | {"Idempotency-Key": "e2e"}
        )
        assert r.status_code == 202, r.text
        location = r.headers["location"]

        _run(env, workdir, "dispatcher", "--once")
        req = httpx.get(f"{base}{location}", headers=h).json()
        assert req["status"] == "queued" and req["job_id"]
        job = httpx.get(f"{base}/v1/jobs/{req['job_id']}", headers=h).json()
        assert job["stage"] == "queued" and job["enqueued_at"] is not None
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=20)

    # The task really is in the embedded broker, addressed to the GPU queue.
    with sqlite3.connect(workdir / "var" / "broker.sqlite") as conn:
        rows = conn.execute(
            "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
        ).fetchall()
    assert [name for name, _ in rows] == ["unlearning"]
    assert req["job_id"] in rows[0][1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A reaped-late zombie counts as gone: it runs nothing and holds no job.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_up_stops_its_worker_when_terminated(tmp_path):
    """`unlearn up` under a process manager gets SIGTERM, not Ctrl-C: the worker it
    started must stop with it rather than run on holding a job."""
    env = _embedded_env()
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        workers = _children(up.pid)
        assert workers, "unlearn up started no worker"
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "the worker outlived `unlearn up`"
    finally:
        if up.poll() is None:
            up.kill()
        for w in workers:
            if _alive(w):
                os.killpg(w, signal.SIGKILL)  # the worker leads its own process group
