from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from workers.audit.policy import AuditPolicy
from workers.ml.specs import DEFAULT_BUILTIN, Item, MethodSpec

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=100,
        pattern=MODEL_NAME_PATTERN,
        description="the name erasure requests use to target this model",
    )
    source: str = Field(
        default=DEFAULT_BUILTIN,
        min_length=1,
        max_length=1000,
        pattern=r"^[^\x00]+$",
        description="'builtin:smollm2-135m-instruct' or an absolute path to a local "
        "Hugging Face causal-LM folder (with config.json)",
    )
    retain: list[Item] = Field(
        default_factory=list,
        description="the operator's utility data (QA pairs or text) kept intact by unlearning",
    )
    default_method: MethodSpec | None = Field(
        default=None, description="method and parameters for requests that give none"
    )
    audit_policy: AuditPolicy | None = Field(
        default=None, description="the audit's pass/fail thresholds (omitted: the defaults)"
    )


class ModelOut(BaseModel):
    name: str
    source: str
    retain_count: int
    default_method: dict[str, object] | None
    audit_policy: dict[str, object] = Field(description="the thresholds in force")
    created_at: datetime
    links: dict[str, str]


class ModelList(BaseModel):
    items: list[ModelOut]
