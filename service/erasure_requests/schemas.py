from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from workers.ml.specs import Item, MethodSpec


class ErasureRequestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=100, description="a registered model's name")
    subject_ref: str = Field(
        min_length=1,
        max_length=255,
        description="your opaque id for the data subject; stored encrypted, trail sees an HMAC",
    )
    items: list[Item] = Field(
        min_length=1, description="what the model must forget about the person"
    )
    holdout: list[Item] = Field(
        default_factory=list,
        description="data of the same kind about no real person (the audit's comparison set)",
    )
    method: MethodSpec | None = Field(
        default=None, description="override the model's default method and parameters"
    )


class RejectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        min_length=3,
        max_length=1000,
        description="why the request is refused; shown to the client, so no personal data",
    )


class ItemDigests(BaseModel):
    salt: str = Field(description="hex salt; digest = sha256(salt || canonical JSON of item)")
    items: list[str]
    holdout: list[str]


class ErasureRequestOut(BaseModel):
    id: str
    status: str
    status_reason: str | None
    model: str
    subject_ref: str
    item_count: int
    holdout_count: int
    item_digests: ItemDigests
    method: dict[str, object] | None
    received_at: datetime
    due_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    job_id: str | None
    adapter_version: int | None
    data_purged_at: datetime | None
    links: dict[str, str]


class ErasureRequestPage(BaseModel):
    items: list[ErasureRequestOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")
