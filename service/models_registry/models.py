from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, new_id, utcnow


class RegisteredModel(Base):
    """A base LLM that erasure requests can target. Retain data is the operator's own
    utility set (not personal data), kept in plain JSON."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    source: Mapped[str] = mapped_column(String(1000))
    # Deferred: up to MAX_RETAIN_ITEMS items, read by the worker, not by every intake.
    retain_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON, deferred=True)
    default_method: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The audit's thresholds (workers.audit.policy.AuditPolicy); None: the defaults.
    audit_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
