"""Pass/fail thresholds of the audit, per model. Pure pydantic, so the gateway can
validate a model's policy without importing torch. Why each default is what it is:
docs/audit.md."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AuditPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Forgetting
    max_forget_prob_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="forget probability after / before, at most; or as low as the holdout "
        "items' before (see `forget_prob_holdout_level`)",
    )
    forget_prob_holdout_level: bool = Field(
        default=True,
        description="the forget probability, and the regression items' (earlier versions' "
        "forgotten items), also pass when at most the holdout items' probability before "
        "(data of the same kind the model never saw): on a model whose answer templates "
        "carry most of the probability, even a model retrained without the person stays "
        "above half its value before (docs/audit.md). False: the ratios alone",
    )
    forget_rouge_margin: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="forget ROUGE-L recall may exceed the holdout items' by at most this "
        "(answers about the person look like answers about people the model never saw)",
    )
    max_value_leak: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="share of greedy answers about the forgotten items that may still "
        "state a specific value (name, number, date, place, e-mail) of the true answer, "
        "above the share for holdout items (chance, itself measured on a few items): one "
        "answer in ten by default; 0 for none at all",
    )
    # Privacy
    max_mia_deviation: float = Field(
        default=0.3,
        ge=0,
        le=0.5,
        description="every membership-inference AUC within 0.5 +/- this (both directions: "
        "a very low AUC means the erasure itself is detectable)",
    )
    mia_min_items: int = Field(
        default=10,
        ge=2,
        description="judge the membership test only with at least this many forget and "
        "holdout items each (with fewer the AUC is too coarse to decide anything)",
    )
    # Utility
    max_retain_nll_increase: float = Field(
        default=0.25,
        ge=0,
        description="retain NLL may rise at most this fraction above its value before, "
        "or by `retain_nll_slack` nats, whichever is larger (the engine's retain guard)",
    )
    retain_nll_slack: float = Field(default=0.1, ge=0)
    min_retain_answers_kept: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="of the retain sample's greedy answers that stated their values before "
        "(a kept customer's phone number, say), the share that must still state them: one "
        "broken answer in ten at most by default; a mean retain NLL barely moves when one "
        "answer breaks",
    )
    min_probe_ratio: float = Field(
        default=0.9, ge=0, le=1, description="general-knowledge accuracy after / before, at least"
    )
    min_utility_ratio: float = Field(
        default=0.9, ge=0, le=1, description="utility harmonic mean after / before, at least"
    )
    probe: bool = Field(
        default=True,
        description="run the general-knowledge probe (102 questions); judged only when the "
        "model answered at least `probe_min_accuracy` of them before",
    )
    probe_min_accuracy: float = Field(default=0.2, ge=0, le=1)
    # Fluency
    max_gibberish_increase: float = Field(default=0.1, ge=0, le=1)
    max_repetition_increase: float = Field(default=0.1, ge=0, le=1)
    max_forget_gibberish_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="share of gibberish answers about the forgotten items, at most "
        "(None: reported, not judged)",
    )
    # Robustness
    robustness_rouge_margin: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description="paraphrased questions and the 8/4-bit quantized model may reveal at "
        "most this much more ROUGE-L than holdout items",
    )
    quantization: bool = Field(default=True, description="re-measure at 8 and 4 bits")
    relearn_steps: int = Field(
        default=0,
        ge=0,
        le=100,
        description="deep audit: fine-tune this many steps on half the forget items, then "
        "measure the other half (0: off)",
    )
    # Regression
    regression_max_prob_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="items forgotten by earlier versions: probability vs the base, at most; "
        "or as low as the holdout items' before (`forget_prob_holdout_level`)",
    )
