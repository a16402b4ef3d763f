from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class AdapterOut(BaseModel):
    """The manifest of one adapter version, as stored in its archive, plus links."""

    model: str
    version: int
    parent_version: int | None = Field(description="the passing version it was trained from")
    status: str = Field(description="'published' (downloadable) or 'quarantined' (failed audit)")
    downloadable: bool
    base_model: dict[str, str]
    covered_requests: list[str]
    method: dict[str, Any]
    files: dict[str, str] = Field(description="file name -> sha256 hex")
    archive: dict[str, Any] = Field(description="sha256 and size of the download")
    metrics: dict[str, Any]
    verdict: dict[str, Any]
    job_id: str
    created_at: datetime
    links: dict[str, str]


class AdapterList(BaseModel):
    items: list[AdapterOut]
    latest: int | None = Field(description="newest version that passed its audit")
