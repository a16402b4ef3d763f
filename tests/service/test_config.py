"""Settings refuse unsafe production configurations."""

from __future__ import annotations

import base64
import os

import pytest
from pydantic import ValidationError

from service.config import Settings

GOOD_KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()
PG = "postgresql+psycopg://u@db/unlearn"


def test_production_refuses_to_start_without_an_encryption_key():
    with pytest.raises(ValidationError, match="DATA_ENCRYPTION_KEY"):
        Settings(environment="production", database_url=PG, data_encryption_key=None)


def test_production_refuses_sqlite():
    with pytest.raises(ValidationError, match="PostgreSQL"):
        Settings(
            environment="production",
            data_encryption_key=GOOD_KEY,
            database_url="sqlite:///var/x.sqlite",
        )


def test_production_with_key_and_postgres_starts():
    s = Settings(environment="production", database_url=PG, data_encryption_key=GOOD_KEY)
    assert s.encryption_key_bytes == base64.urlsafe_b64decode(GOOD_KEY)


@pytest.mark.parametrize("key", ["not base64 !!", base64.urlsafe_b64encode(b"short").decode()])
def test_bad_keys_are_refused(key):
    with pytest.raises(ValidationError, match="DATA_ENCRYPTION_KEY"):
        Settings(data_encryption_key=key)


def test_development_defaults_need_no_external_service(monkeypatch):
    for var in ("DATABASE_URL", "BROKER_URL", "ENVIRONMENT", "DATA_ENCRYPTION_KEY"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(_env_file=None)
    assert s.database_url.startswith("sqlite:///") and s.is_sqlite
    assert s.broker_url.startswith("sqla+sqlite:///")
    assert len(s.encryption_key_bytes) == 32


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("MAX_ITEMS_PER_REQUEST", "7")
    monkeypatch.setenv("BATCH_WINDOW_SECONDS", "12.5")
    s = Settings(_env_file=None)
    assert s.max_items_per_request == 7 and s.batch_window_seconds == 12.5
