"""Alembic: upgrade to head and back to base on a fresh PostgreSQL database, and the
migrations match the ORM models (no forgotten revision)."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service.cli import _alembic_config
from service.tables import Base
from tests.conftest import PG_ADMIN_URL


@pytest.fixture
def scratch_pg():
    name = f"unlearn_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _config(url: str):
    cfg = _alembic_config()
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def test_upgrade_head_downgrade_base_upgrade_again(scratch_pg):
    cfg = _config(scratch_pg)
    engine = create_engine(scratch_pg)
    command.upgrade(cfg, "head")
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    command.downgrade(cfg, "base")
    engine.dispose()
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    engine.dispose()
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_migrations_match_the_models(scratch_pg):
    command.upgrade(_config(scratch_pg), "head")
    engine = create_engine(scratch_pg)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models changed without a migration: {diff}"


def test_sqlite_upgrade_and_downgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'embedded.sqlite'}"
    cfg = _config(url)
    command.upgrade(cfg, "head")
    engine = create_engine(url)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    command.downgrade(cfg, "base")
    engine.dispose()
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
