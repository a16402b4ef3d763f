from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, validates

from service.db import Base, UTCDateTime, new_id, utcnow
from service.states import JobStage, check_job

_STAGES = ", ".join(f"'{s.value}'" for s in JobStage)


class Job(Base):
    """One unlearning run over a batch of requests for one model and method."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"stage IN ({_STAGES})", name="stage_known"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        Index("ix_jobs_stage_heartbeat", "stage", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    method: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # None: the model's default
    stage: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    # The passing adapter version this job continues (fixed at the first claim so that a
    # resumed run trains from the same weights); None: from the base model.
    parent_version: Mapped[int | None] = mapped_column(Integer)
    # Audit retries done (an adapter that fails its audit is retrained, stronger).
    audit_rounds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The settings of the audit round in progress (None: round 0, as asked). A resumed
    # job trains that round on with them: the retry's settings depend on the failed
    # audit before it, which a new worker does not have.
    round_method: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(String(2000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    @validates("stage")
    def _guard_stage(self, _key: str, value: str) -> str:
        return check_job(self.stage, value).value
