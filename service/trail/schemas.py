from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class AuditEventOut(BaseModel):
    seq: int
    occurred_at: datetime
    actor: str
    event_type: str
    object_type: str
    object_id: str
    details: dict[str, Any]
    payload_digest: str
    prev_hash: str
    hash: str


class AuditEventPage(BaseModel):
    items: list[AuditEventOut]
    next_cursor: int | None


class VerifyOut(BaseModel):
    ok: bool
    events_checked: int
    last_seq: int | None
    first_broken_seq: int | None
    problem: str | None
