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


async def _level(
    url: str, token: str, concurrency: int, n: int
) -> tuple[list[float], dict[int, int], float]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex}
                t = time.perf_counter()
                r = await client.post("/v1/erasure-requests", json=_body(i), headers=headers)
                latencies.append(time.perf_counter() - t)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, codes, wall


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=1000)
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
            lat, codes, wall = asyncio.run(_level(url, token, level, args.requests))
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
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
