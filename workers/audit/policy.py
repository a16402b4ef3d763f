"""Pass/fail thresholds of the audit. Pure pydantic, so the gateway can validate a
model's policy without importing torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AuditPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_forget_prob_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="forget probability after / before must be at most this",
    )
    max_retain_nll_increase: float = Field(
        default=0.25,
        ge=0,
        description="retain NLL may rise at most this fraction above its value before, "
        "or by `retain_nll_slack` nats, whichever is larger (the engine's retain guard)",
    )
    retain_nll_slack: float = Field(default=0.1, ge=0)
