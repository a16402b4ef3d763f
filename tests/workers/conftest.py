"""The workers' stage: real Celery worker processes started here, real Redis, the test
PostgreSQL database with real commits, the dispatcher ticking in a thread, the API in
process (TestClient without overrides, so it sees what the workers commit), and the tiny
fine-tuned model registered as a local Hugging Face folder."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import REDIS_URL, Keys, auth, mint_keys, submit
from tests.ml.targets import (
    FORGET,
    FORGET_B,
    RETAIN,
    TINY_ANSWER_GUARD_OFF,
    TINY_AUDIT_POLICY,
)
from workers.allocator import with_jemalloc

ROOT = Path(__file__).resolve().parents[2]
# SimNPO: on the tiny target it passes the standard audit within 30 steps (measured:
# forget probability 0.86 -> 0.14, retain NLL unchanged), where NPO needs far more.
FAST_METHOD = {
    "name": "simnpo",
    "lr": 5e-3,
    "max_steps": 30,
    "eval_every": 2,
    **TINY_ANSWER_GUARD_OFF,
}
# Enough steps (about 12 s) that a test can act while the job trains.
SLOW_METHOD = {
    "name": "simnpo",
    "lr": 1e-3,
    "max_steps": 600,
    "eval_every": 100,
    "checkpoint_every": 25,
    "stop_forget_ratio": None,
    **TINY_ANSWER_GUARD_OFF,
}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Worker:
    """`celery worker` in its own process group (so a kill takes its pool children too)."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                "unlearning,default",
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)


@dataclass
class Stack:
    client: TestClient
    keys: Keys
    sessions: sessionmaker[Session]
    env: dict[str, str]
    tmp: Path
    model: str = "tiny"
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, name: str = "w1") -> Worker:
        worker = Worker(name, self.env, self.tmp / f"{name}.log")
        self.workers.append(worker)
        return worker

    def submit(self, items: list[dict[str, str]], method: dict | None = None) -> str:
        body: dict[str, Any] = {"model": self.model, "subject_ref": "subject", "items": items}
        if method:
            body["method"] = method
        r = submit(self.client, self.keys.a, body)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def request(self, request_id: str) -> dict:
        r = self.client.get(f"/v1/erasure-requests/{request_id}", headers=auth(self.keys.a))
        assert r.status_code == 200, r.text
        return r.json()

    def wait_status(self, request_id: str, statuses: set[str], timeout: float = 180) -> dict:
        return wait_for(
            f"request {request_id} to be one of {statuses}",
            lambda: (r := self.request(request_id))["status"] in statuses and r,
            timeout,
        )

    def logs(self) -> str:
        return "\n".join(w.log.read_text(errors="replace")[-4000:] for w in self.workers)


def _dispatch_loop(stop: threading.Event) -> None:
    from service.dispatcher import tick

    while not stop.is_set():
        with contextlib.suppress(Exception):  # Redis restarting: the next tick retries
            tick()
        stop.wait(0.3)


@pytest.fixture
def live_url(stack: Stack) -> Iterator[str]:
    """The API over real HTTP (uvicorn in a thread), for the Python client."""
    import socket

    import uvicorn

    from service.main import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("uvicorn", lambda: server.started, timeout=20)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def broker_url() -> str:
    """The Redis database the stage uses as its broker, emptied first."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    return REDIS_URL


@pytest.fixture
def stack(
    live_db: sessionmaker[Session], settings: Any, tmp_path: Path, tiny_target: str, broker_url: str
) -> Iterator[Stack]:
    from service.adapters.store import get_store
    from service.main import create_app
    from service.queue import producer

    overrides = {
        "artifact_root": tmp_path / "artifacts",
        "work_root": tmp_path / "work",
        "model_cache": tmp_path / "models",
        "broker_url": broker_url,
        "heartbeat_interval_seconds": 0.5,
        "heartbeat_timeout_seconds": 4.0,
        "enqueue_resend_seconds": 20.0,
        "transient_retries": 8,
    }
    for key, value in overrides.items():
        setattr(settings, key, value)
    get_store.cache_clear()
    producer.cache_clear()
    env = with_jemalloc(  # the workers' allocator, as `unlearn up` gives its worker
        {
            **os.environ,
            **{k.upper(): str(v) for k, v in overrides.items()},
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    with live_db() as s:
        keys = mint_keys(s)
    stop = threading.Event()
    dispatcher = threading.Thread(target=_dispatch_loop, args=(stop,), daemon=True)
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        r = client.post(
            "/v1/models",
            json={
                "name": "tiny",
                "source": tiny_target,
                "retain": RETAIN,
                "audit_policy": TINY_AUDIT_POLICY,
            },
            headers=auth(keys.admin),
        )
        assert r.status_code == 201, r.text
        st = Stack(client, keys, live_db, env, tmp_path)
        dispatcher.start()
        try:
            yield st
        finally:
            stop.set()
            dispatcher.join(timeout=10)
            for w in st.workers:
                w.stop()
    get_store.cache_clear()
    producer.cache_clear()


__all__ = ["FAST_METHOD", "FORGET", "FORGET_B", "SLOW_METHOD", "Stack", "wait_for"]
