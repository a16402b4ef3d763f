from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, new_id, utcnow

PUBLISHED = "published"  # passed its audit: downloadable
QUARANTINED = "quarantined"  # failed its audit: kept as evidence, never downloadable


class AdapterVersion(Base):
    """One immutable, numbered LoRA adapter of a model. Rows are only ever inserted:
    versions are gap-free per model (unique (model_id, version), publishes serialised by
    a lock on the model row)."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        CheckConstraint(f"status IN ('{PUBLISHED}', '{QUARANTINED}')", name="status_known"),
        CheckConstraint("version >= 1", name="version_positive"),
        UniqueConstraint("model_id", "version", name="uq_adapter_versions_model_version"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    version: Mapped[int] = mapped_column(Integer)
    # The passing version this one was trained from (None: from the base model).
    parent_version: Mapped[int | None] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"passed": bool, "failed": [...]}
    covered_requests: Mapped[list[str]] = mapped_column(JSON)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_model_digest: Mapped[str] = mapped_column(String(80))
    files: Mapped[dict[str, str]] = mapped_column(JSON)  # name -> sha256 (store folder)
    storage_prefix: Mapped[str] = mapped_column(String(500))
    archive_sha256: Mapped[str] = mapped_column(String(64))
    archive_bytes: Mapped[int] = mapped_column(BigInteger)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)  # the engine's record
    audit: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
