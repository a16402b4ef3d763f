"""Jobs survive what production throws at them: a worker SIGKILLed mid-training, a
client canceling mid-training, the broker restarting mid-job."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.adapters.models import AdapterVersion
from service.jobs.models import Job
from tests.conftest import auth
from tests.workers.conftest import FAST_METHOD, FORGET, FORGET_B, SLOW_METHOD, Stack, wait_for


def _job_id(stack: Stack, request_id: str) -> str:
    return wait_for("a job", lambda: stack.request(request_id).get("job_id"))


def _job(stack: Stack, job_id: str) -> Job:
    with stack.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _versions(stack: Stack) -> list[AdapterVersion]:
    with stack.sessions() as s:
        rows = list(s.scalars(select(AdapterVersion).order_by(AdapterVersion.version)))
        s.expunge_all()
        return rows


def _checkpoint(stack: Stack, job_id: str) -> list[Path]:
    return list((stack.tmp / "work" / job_id).glob("*/round0/checkpoint.pt"))


def test_worker_killed_mid_training_resumes_and_publishes_exactly_once(stack: Stack):
    first = stack.start_worker("w1")
    rid = stack.submit(FORGET, method=SLOW_METHOD)
    job_id = _job_id(stack, rid)
    wait_for("a checkpoint", lambda: _checkpoint(stack, job_id), timeout=120)
    assert _job(stack, job_id).stage == "training"
    first.kill(signal.SIGKILL)

    stack.start_worker("w2")
    done = stack.wait_status(rid, {"completed", "failed"}, timeout=240)
    assert done["status"] == "completed", (done, stack.logs())

    [version] = _versions(stack)
    assert version.version == 1 and version.covered_requests == [rid]
    assert version.record["outcome"]["resumed_from"] >= SLOW_METHOD["checkpoint_every"]
    assert version.record["outcome"]["steps"] == SLOW_METHOD["max_steps"]
    job = _job(stack, job_id)
    assert (job.stage, job.attempts) == ("succeeded", 2)
    with stack.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
    verify = stack.client.get("/v1/audit/verify", headers=auth(stack.keys.admin)).json()
    assert verify["ok"], verify


def test_cancel_during_training_publishes_nothing_and_frees_the_worker(stack: Stack):
    stack.start_worker()
    rid = stack.submit(FORGET, method=SLOW_METHOD)
    job_id = _job_id(stack, rid)
    wait_for("training", lambda: _checkpoint(stack, job_id), timeout=120)

    r = stack.client.post(f"/v1/erasure-requests/{rid}/cancel", headers=auth(stack.keys.a))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"
    assert _job(stack, job_id).stage == "canceled"
    # The worker stops between two steps and removes the job's work folder.
    wait_for("the work folder to go", lambda: not (stack.tmp / "work" / job_id).exists(), 60)
    assert _versions(stack) == []
    store = stack.tmp / "artifacts"
    assert not store.exists() or [p for p in store.rglob("*") if p.is_file()] == []

    # The worker is free again: the next request is served at once.
    nxt = stack.submit(FORGET_B, method=FAST_METHOD)
    assert stack.wait_status(nxt, {"completed", "failed"}, 120)["status"] == "completed"
    assert [v.version for v in _versions(stack)] == [1]


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for("redis to listen", self._listening, timeout=10)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def broker_url(own_redis: RedisServer) -> str:
    """This module's stage runs on a Redis of its own, which the test restarts."""
    return own_redis.url


def test_broker_restart_while_a_job_runs_still_completes_it_once(
    stack: Stack, own_redis: RedisServer
):
    stack.start_worker()
    rid = stack.submit(FORGET, method=SLOW_METHOD)
    job_id = _job_id(stack, rid)
    wait_for("training", lambda: _checkpoint(stack, job_id), timeout=120)
    own_redis.kill()  # everything in it is gone, the task message included
    time.sleep(2)
    own_redis.start()

    done = stack.wait_status(rid, {"completed", "failed"}, timeout=240)
    assert done["status"] == "completed", (done, stack.logs())
    assert [v.version for v in _versions(stack)] == [1]
    job = _job(stack, job_id)
    assert (job.stage, job.attempts) == ("succeeded", 1)
