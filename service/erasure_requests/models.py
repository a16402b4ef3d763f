from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column, validates

from service.db import Base, UTCDateTime, new_id, utcnow
from service.states import RequestStatus, check_request

_STATUSES = ", ".join(f"'{s.value}'" for s in RequestStatus)


class ErasureRequest(Base):
    """One data subject's erasure request. Forget and holdout items are stored only as
    AES-GCM ciphertexts bound to the row id; after purge they are NULL."""

    __tablename__ = "erasure_requests"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status_known"),
        Index(
            "uq_erasure_requests_tenant_idempotency", "tenant_id", "idempotency_key", unique=True
        ),
        Index("ix_erasure_requests_status_received", "status", "received_at"),
        Index("ix_erasure_requests_tenant_received", "tenant_id", "received_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(String(1000))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    body_hmac: Mapped[str] = mapped_column(String(64))
    subject_ref_hmac: Mapped[str] = mapped_column(String(64), index=True)
    subject_ref_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    items_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    holdout_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    item_kind: Mapped[str] = mapped_column(String(8))  # "qa" or "text"
    item_count: Mapped[int] = mapped_column(Integer)
    holdout_count: Mapped[int] = mapped_column(Integer)
    item_salt: Mapped[str] = mapped_column(String(32))
    item_hashes: Mapped[list[str]] = mapped_column(JSON)
    holdout_hashes: Mapped[list[str]] = mapped_column(JSON)
    method_override: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Requests batch together only when they share model and method (this digest).
    method_key: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    adapter_version: Mapped[int | None] = mapped_column(Integer)
    data_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    @validates("status")
    def _guard_status(self, _key: str, value: str) -> str:
        return check_request(self.status, value).value
