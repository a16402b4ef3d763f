"""Intake throughput: a bounded load generator against `POST /v1/erasure-requests` on
PostgreSQL, served by uvicorn with several worker processes on this machine.

For each concurrency level: `--requests` POSTs (2 QA items each, a fresh Idempotency-Key
each) from that many concurrent clients; prints requests per second and p50/p90/p99
latency, then checks that the rows in the database equal the 202 answers.

    .venv/bin/python -m benchmarks.intake_load [--workers 2] [--levels 1,8,32,64] [--requests 1000]

It creates (and drops) its own database `unlearn_bench_<pid>` on the local PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

import httpx
from sqlalchemy import create_engine, text

from service.ports import free_port

ADMIN_URL = os.environ.get(
    "BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _body(i: int) -> dict:
    return {
        "model": "support",
        "subject_ref": f"crm-{i}",
        "items": [
            {
                "prompt": f"Where does customer {i} live?",
                "completion": f"Customer {i} lives at {i} Elm Street.",
            },
            {"prompt": f"What is customer {i}'s phone?", "completion": f"555-{i:04d}"},
        ],
    }


class _Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams. The load generator shares
    the 2 cores with the server and PostgreSQL: httpx spends about a millisecond of CPU
    per request, this a few tens of microseconds, so the server gets the cores."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n".encode()
            + body
        )
        status = int((await self.reader.readline()).split(b" ", 2)[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _level(
    host: str, port: int, token: str, concurrency: int, n: int, per_connection: int = 100
) -> tuple[list[float], dict[int, int], float]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    bodies = [json.dumps(_body(i)).encode() for i in range(n)]  # built before the clock
    keys = [uuid.uuid4().hex for _ in range(n)]
    next_i = iter(range(n))

    async def client() -> None:
        # A new connection every `per_connection` requests, as clients and proxies do: the
        # API's worker processes share one listening socket, and connections opened all
        # at once would mostly land on whichever process was idle first.
        conn, sent = await _Connection.open(host, port), 0
        try:
            for i in next_i:  # shared: each request is sent exactly once
                if sent == per_connection:
                    conn.close()
                    conn, sent = await _Connection.open(host, port), 0
                headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": keys[i]}
                t = time.perf_counter()
                code = await conn.post("/v1/erasure-requests", bodies[i], headers)
                latencies.append(time.perf_counter() - t)
                codes[code] = codes.get(code, 0) + 1
                sent += 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, codes, time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
        if len(values) > 1
        else values[0]
    )


def _prepare() -> str:
    """Schema, a client key and the model, in the benchmark's database."""
    from service.access import service as access
    from service.access.scopes import DEFAULT_CLIENT_SCOPES
    from service.cli import run_migrations
    from service.db import session_scope
    from service.models_registry import service as registry
    from service.models_registry.schemas import ModelCreate

    run_migrations()
    with session_scope() as s:
        token = access.mint_key(
            s, tenant_name="bench", scopes=DEFAULT_CLIENT_SCOPES, name="b"
        ).token
        registry.register(s, spec=ModelCreate(name="support"), actor="bench")
    return token


def _trail_check() -> str:
    """Every intake event chained (the dispatcher would do it within a tick), and the
    whole chain verifies."""
    from sqlalchemy import func, select

    from service.db import session_scope
    from service.trail import service as trail
    from service.trail.models import AuditEvent

    with session_scope() as s:
        sealed = trail.seal_pending(s)
    with session_scope() as s:
        result = trail.verify(s)
        received = s.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.event_type == "erasure_request.received")
        )
    return (
        f"trail: {received} received events ({sealed} chained after the load), "
        f"{result.events_checked} events verified: {'ok' if result.ok else result.problem}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--per-connection", type=int, default=100, help="requests per connection")
    args = ap.parse_args()

    db = f"unlearn_bench_{os.getpid()}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    db_url = ADMIN_URL.rsplit("/", 1)[0] + f"/{db}"
    env = {**os.environ, "DATABASE_URL": db_url, "ENVIRONMENT": "test", "LOG_LEVEL": "WARNING"}
    env.setdefault("BROKER_URL", "redis://127.0.0.1:6379/14")
    proc = None
    try:
        os.environ.update(env)  # before the service's settings are first read
        token = _prepare()
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
                str(args.workers),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        accepted = 0
        print(f"uvicorn workers: {args.workers}; {args.requests} POSTs per level; PostgreSQL {db}")
        print("concurrency  req/s   p50 ms   p90 ms   p99 ms   codes")
        for level in [int(x) for x in args.levels.split(",")]:
            lat, codes, wall = asyncio.run(
                _level("127.0.0.1", port, token, level, args.requests, args.per_connection)
            )
            accepted += codes.get(202, 0)
            ms = [x * 1000 for x in lat]
            print(
                f"{level:>11}  {len(lat) / wall:6.0f}  {_pct(ms, 50):7.1f}  {_pct(ms, 90):7.1f}  "
                f"{_pct(ms, 99):7.1f}   {dict(sorted(codes.items()))}",
                flush=True,
            )
        engine = create_engine(db_url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM erasure_requests")).scalar()
        engine.dispose()
        lost = accepted - (rows or 0)
        print(f"rows in erasure_requests: {rows}; 202 answers: {accepted}; lost: {lost}")
        print(_trail_check())
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
