from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class JobOut(BaseModel):
    id: str
    model: str
    stage: str = Field(
        description="queued, preparing, training, evaluating, packaging, "
        "succeeded, failed or canceled"
    )
    progress: float = Field(ge=0, le=1)
    attempts: int
    max_attempts: int
    requests: list[str] = Field(description="the covered requests you can see")
    method: dict[str, object] | None
    parent_version: int | None = Field(description="the adapter version it continues from")
    adapter_version: int | None = Field(description="the version it published")
    audit_rounds: int = Field(description="audit retries done with stronger settings")
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    error: str | None
    links: dict[str, str]
