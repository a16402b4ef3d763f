"""All settings in one place, read from the environment (and `.env`) by pydantic-settings.

Development defaults need no external service: SQLite and a SQLite-backed kombu
transport under ./var. Production refuses to start without an encryption key and
with an embedded database.
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

VAR_DIR = Path("var")

# A fixed key so that development databases stay readable across restarts. Never used
# when ENVIRONMENT=production (the validator below refuses to start without a real one).
_DEV_KEY = base64.urlsafe_b64encode(b"unlearn-development-key-32bytes!").decode()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"

    database_url: str = Field(
        default=f"sqlite:///{VAR_DIR / 'unlearn.sqlite'}",
        description="SQLAlchemy URL. PostgreSQL in production (postgresql+psycopg://...).",
    )
    db_pool_size: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="connections each API or worker process keeps open (PostgreSQL); "
        "at least the requests it serves at once, or connections are opened and closed "
        "per request",
    )
    db_max_overflow: int = Field(
        default=10, ge=0, le=1000, description="extra connections above the pool, for bursts"
    )
    intake_concurrency: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="erasure-request submits each API process runs at once; the rest wait "
        "on its event loop. A submit is mostly Python holding the GIL: more threads only "
        "contend for it (measured on 2 cores with a local PostgreSQL: 4 gave p99 under "
        "100 ms at 500 req/s, 40 did not; BENCHMARKS.md). Raise it when the database is "
        "remote, where a submit spends most of its time waiting",
    )
    broker_url: str = Field(
        default=f"sqla+sqlite:///{VAR_DIR / 'broker.sqlite'}",
        description="Celery broker. Redis in production; kombu's SQLAlchemy transport embedded.",
    )
    artifact_root: Path = Field(
        default=VAR_DIR / "artifacts",
        description="the artifact store (published adapters); shared by API and workers",
    )
    work_root: Path = Field(
        default=VAR_DIR / "work",
        description="workers' job folders (checkpoints); a volume shared by every worker, "
        "so a job resumes on another worker after a crash",
    )
    model_cache: Path = Field(
        default=VAR_DIR / "models",
        description="where the built-in model is unpacked to safetensors once",
    )

    data_encryption_key: str | None = Field(
        default=None,
        description="base64 (url-safe) of 32 random bytes: AES-256-GCM key for forget data "
        "and HMAC key for subject references. `unlearn keys gen-data-key` prints one.",
    )

    # Batching: a model's pending requests become one job once the oldest has waited
    # `batch_window_seconds` or `batch_max_requests` are pending, whichever comes first.
    batch_window_seconds: float = Field(default=30.0, ge=0)
    batch_max_requests: int = Field(default=16, ge=1)
    dispatch_interval_seconds: float = Field(default=2.0, gt=0)
    # A job enqueued but not claimed after this long is sent again (a broker without
    # persistence can lose a message; a duplicate is harmless, claiming is idempotent).
    enqueue_resend_seconds: float = Field(default=600.0, gt=0)

    # The reaper: a running job whose last heartbeat is older than this is presumed dead.
    heartbeat_timeout_seconds: float = Field(default=300.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    # Workers beat more often than the timeout so that one lost beat is not a death.
    heartbeat_interval_seconds: float = Field(default=30.0, gt=0)
    # Celery time limits of one unlearning task: past the soft one the job fails with a
    # reason; the hard one kills the process (see docs/workers.md).
    job_soft_time_limit_seconds: int = Field(default=4 * 3600, ge=10)
    job_time_limit_grace_seconds: int = Field(default=300, ge=1)
    # The precision unlearning jobs compute in. auto: bfloat16 on CUDA and on CPUs with
    # bfloat16 instructions (AVX512-BF16, AMX; measured 1.4-1.6x faster with the
    # same outcome, BENCHMARKS.md), else float32. The audit always judges in the serving
    # precision (float32 on a CPU).
    train_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # An adapter that fails its audit is retrained with stronger settings this many times
    # before the job fails and the adapter is quarantined.
    audit_retries: int = Field(default=1, ge=0)
    # Database / store operations of a worker retried with exponential backoff this many
    # times before the worker gives the job up (the reaper then re-queues it).
    transient_retries: int = Field(default=6, ge=1)

    # Raw forget items are purged this long after the adapter that covers them passed
    # its audit and was published (see docs/design.md, "Retention").
    retention_days: float = Field(default=30.0, ge=0)

    # Intake limits.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_items_per_request: int = Field(default=500, ge=1)
    max_holdout_items: int = Field(default=500, ge=0)
    max_item_bytes: int = Field(default=8_192, ge=16)
    max_retain_items: int = Field(default=5_000, ge=0)

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("data_encryption_key")
    @classmethod
    def _key_is_32_bytes(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(value.encode())
        except (binascii.Error, ValueError) as exc:
            raise ValueError("DATA_ENCRYPTION_KEY must be url-safe base64") from exc
        if len(raw) != 32:
            raise ValueError("DATA_ENCRYPTION_KEY must decode to exactly 32 bytes")
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production":
            if not self.data_encryption_key:
                raise ValueError(
                    "ENVIRONMENT=production needs DATA_ENCRYPTION_KEY "
                    "(generate one with `unlearn keys gen-data-key`)"
                )
            if self.database_url.startswith("sqlite"):
                raise ValueError("ENVIRONMENT=production needs a PostgreSQL DATABASE_URL")
        return self

    @property
    def encryption_key_bytes(self) -> bytes:
        return base64.urlsafe_b64decode((self.data_encryption_key or _DEV_KEY).encode())

    @property
    def job_time_limit_seconds(self) -> int:
        return self.job_soft_time_limit_seconds + self.job_time_limit_grace_seconds

    @property
    def broker_visibility_timeout_seconds(self) -> int:
        # Longer than the longest job: Redis redelivers an unacknowledged task after this,
        # and a redelivery while the job still runs would only be refused by the claim.
        return self.job_time_limit_seconds + 3600

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
