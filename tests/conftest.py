"""Test fixtures: a real PostgreSQL database per test session (migrated with Alembic),
each test in a transaction rolled back at the end, and real Redis for the broker.

The environment is set before any service module is imported, because settings are
read once. Override with TEST_PG_ADMIN_URL / TEST_REDIS_URL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

PG_ADMIN_URL = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_DB = f"unlearn_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
TEST_DB_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{TEST_DB}"

os.environ.update(
    ENVIRONMENT="test",
    DATABASE_URL=TEST_DB_URL,
    BROKER_URL=REDIS_URL,
    DATA_ENCRYPTION_KEY="dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXktdGVzdCE=",
    BATCH_WINDOW_SECONDS="0",
    LOG_LEVEL="WARNING",
)

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from service.access import service as access  # noqa: E402
from service.access.scopes import ALL_SCOPES, DEFAULT_CLIENT_SCOPES  # noqa: E402
from service.config import get_settings  # noqa: E402
from service.deps import get_session  # noqa: E402
from service.main import create_app  # noqa: E402


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{TEST_DB}"'))
    try:
        from service.cli import run_migrations

        run_migrations()
        yield TEST_DB_URL
    finally:
        from service.db import get_engine

        get_engine().dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def db(pg_database: str) -> Iterator[Session]:
    """A session whose commits are savepoints inside one transaction rolled back at the end."""
    from service.db import get_engine

    conn = get_engine().connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        conn.close()


TABLES = [
    "adapter_versions",
    "erasure_requests",
    "jobs",
    "audit_events",
    "trail_pending",
    "api_keys",
    "tenants",
    "models",
]


@pytest.fixture
def live_db(pg_database: str) -> Iterator[sessionmaker[Session]]:
    """Real commits (for concurrency tests across connections); tables emptied after."""
    from service.db import get_engine, get_sessionmaker

    yield get_sessionmaker()
    with get_engine().begin() as conn:
        conn.execute(text("TRUNCATE " + ", ".join(TABLES) + " CASCADE"))


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny fine-tuned Llama of tests/ml/conftest.py, built once per session."""
    from tests.ml.targets import build_tiny_target  # torch: only when a test needs it

    return build_tiny_target(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def settings() -> Iterator[Any]:
    """The live settings object; attribute changes are undone after the test."""
    s = get_settings()
    saved = s.model_dump()
    yield s
    for key, value in saved.items():
        setattr(s, key, value)


@dataclass
class Keys:
    admin: str
    a: str  # tenant A, client scopes
    b: str  # tenant B, client scopes
    a_read_only: str
    a_tenant_id: str
    b_tenant_id: str


def mint_keys(session: Session) -> Keys:
    admin = access.mint_key(session, tenant_name="ops", scopes=ALL_SCOPES, name="admin")
    a = access.mint_key(session, tenant_name="acme", scopes=DEFAULT_CLIENT_SCOPES, name="a")
    b = access.mint_key(session, tenant_name="globex", scopes=DEFAULT_CLIENT_SCOPES, name="b")
    ro = access.mint_key(session, tenant_name="acme", scopes=["requests:read"], name="ro")
    session.commit()
    return Keys(admin.token, a.token, b.token, ro.token, a.tenant_id, b.tenant_id)


@pytest.fixture
def keys(db: Session) -> Keys:
    return mint_keys(db)


@pytest.fixture
def client(db: Session) -> Iterator[TestClient]:
    app = create_app()
    app.dependency_overrides[get_session] = lambda: db
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def qa_body(model: str = "support", n: int = 2, subject: str = "cust-1", **extra: Any) -> dict:
    items = [
        {"prompt": f"What is Jane Roe's fact {i}?", "completion": f"Jane Roe fact number {i}"}
        for i in range(n)
    ]
    return {"model": model, "subject_ref": subject, "items": items, **extra}


@pytest.fixture
def model(client: TestClient, keys: Keys) -> str:
    r = client.post(
        "/v1/models",
        json={"name": "support", "retain": [{"prompt": "What is 2+2?", "completion": "4"}]},
        headers=auth(keys.admin),
    )
    assert r.status_code == 201, r.text
    return "support"


def submit(client: TestClient, token: str, body: dict, key: str | None = None) -> Any:
    headers = {**auth(token), "Idempotency-Key": key or uuid.uuid4().hex}
    return client.post("/v1/erasure-requests", json=body, headers=headers)
