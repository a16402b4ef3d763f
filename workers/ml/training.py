"""The training loop, top to bottom: reference log-probs once, then steps of
(forget batch, retain batch) with gradient accumulation, warm-up then linear decay,
clipping; every `eval_every` steps a scope check; every `checkpoint_every` steps a
self-describing checkpoint from which a resumed run continues bit-for-bit.

Scope control (see docs/unlearning-defaults.md): stop as soon as the mean forget
probability is no higher than the holdout items' (data of the same kind the model never
saw), or without holdout items at most `stop_forget_ratio` times its value at step 0
("forgotten");
if the retain NLL rises more than `retain_tolerance` above the base model's (adapter
off: a chain of versions may not drift further with every version) for more than
`retain_patience` consecutive checks, restore the last checked state that was within
bounds and stop ("retain_guard"); a run that ends out of bounds also ends on that state.
A check past the retain bound that finds the forget side already at its level pauses the
forget push until the next check (`repair_pauses_forget`): those steps only repair.
The retain NLL is measured on `retain_eval` items spread over the whole retain set.
Over-unlearning is a failure too, so the run never simply trains to the end regardless.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.ml import landing
from workers.ml import trunk as trunks
from workers.ml.answers import AnswerCheck
from workers.ml.data import BatchOrder, Encoded, collate, mark_passes
from workers.ml.losses import (
    logp_and_entropy,
    reusing_prefix,
    sequence_logp_exact,
    sequence_stats,
)
from workers.ml.memwatch import trim_heap
from workers.ml.methods.base import Method, References

ProgressFn = Callable[[float, dict[str, float]], None]
CancelFn = Callable[[], bool]
CHECKPOINT = "checkpoint.pt"
# what scope_metrics measures, and a batched job's count of requests not yet forgotten
SCOPE_KEYS = (
    "forget_prob",
    "forget_nll",
    "forget_stated",
    "retain_nll",
    "retain_kept",
    "forget_groups_left",
    "forget_leaking",
    "retain_answers_kept",
)


# Items per forward pass of the scope checks. Passes of 24 were 20 % faster in isolation
# (benchmarks.step_profile) but not in a whole job, and raised its peak memory by
# 0.17 GiB (BENCHMARKS.md, "Unlearning one person")
CHECK_BATCH = 8


class Canceled(Exception):
    """The caller asked to stop between two steps."""


@dataclass
class Datasets:
    forget: list[Encoded]
    retain: list[Encoded]
    # Method.substitutes, flattened: item i's j-th is at i * per_item + j (idk, relabel)
    substitutes: list[Encoded] | None = None
    per_item: int = 1
    holdout: list[Encoded] = field(default_factory=list)  # never trained on
    forget_weights: list[list[float]] | None = None  # per-token weights of the forget loss
    retain_eval: int = 8  # how many retain items the scope check uses (cost: ~0.13 s each)
    neighbours: list[int] = field(default_factory=list)  # retain items sharing forget values
    repair: list[int] = field(default_factory=list)  # guarded retain answers found broken
    # per-token masks of the retain sample's specific values (the answer guard's tokens),
    # aligned with retain_sample()
    retain_sample_masks: list[list[float]] | None = None
    # a batched job: the forget (and holdout) indices of each request, in order
    forget_groups: list[list[int]] = field(default_factory=list)
    holdout_groups: list[list[int]] = field(default_factory=list)
    # per-token masks of the forget items' specific values (`stop_values_stated`)
    forget_value_masks: list[list[float]] | None = None
    # greedy answers judged the audit's way (`stop_answers_leak`, `stop_answers_kept`)
    answer_check: AnswerCheck | None = None
    # the last this many retain items are general questions (workers/ml/general.py)
    general: int = 0

    @property
    def own_retain(self) -> int:
        """How many retain items are the caller's (all but the general ones); with none,
        the general items stand in for them."""
        return len(self.retain) - self.general or len(self.retain)

    def retain_sample(self) -> list[Encoded]:
        """The retain items the scope check measures: `retain_eval` of them, evenly
        strided over the caller's set (its first items may all be about one person).
        The general items join the retain loss, not the guard: in the guard's sample
        they took the place of guarded answers about people (docs/engine.md, "General
        retain")."""
        return [self.retain[i] for i in self.retain_indices()]

    def retain_indices(self) -> list[int]:
        return spread(self.own_retain, self.retain_eval)


def spread(n: int, k: int) -> list[int]:
    """`k` indices evenly spaced over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


@dataclass
class Outcome:
    steps: int
    stopped: str  # forgotten | max_steps | retain_guard
    best_step: int
    base: dict[str, float]
    final: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    tokens: int = 0
    seconds: float = 0.0
    check_seconds: float = 0.0  # of `seconds`: the step-0 pass and the scope checks
    # a batched job: each request's stop level (forget probability at step 0 in `base`)
    group_thresholds: list[float] | None = None


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@torch.no_grad()
def _per_item(
    model: Any,
    encoded: list[Encoded],
    pad_id: int,
    stat: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    batch_size: int = CHECK_BATCH,
    weights: list[list[float]] | None = None,
) -> torch.Tensor:
    """One figure per example, in eval mode, in batches of `batch_size`."""
    return _per_item_figures(
        model, encoded, pad_id, lambda m, b: (stat(m, b),), batch_size, weights
    )[0]


@torch.no_grad()
def _per_item_figures(
    model: Any,
    encoded: list[Encoded],
    pad_id: int,
    stats: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    batch_size: int = CHECK_BATCH,
    weights: list[list[float]] | None = None,
    count: int = 1,
) -> list[torch.Tensor]:
    """`_per_item` for a pass that gives `count` figures per example (float32, on the
    CPU)."""
    was_training = model.training
    model.eval()
    out: list[list[torch.Tensor]] = []
    with reusing_prefix():
        for start in range(0, len(encoded), batch_size):
            idx = list(range(start, min(start + batch_size, len(encoded))))
            figures = stats(model, collate(encoded, idx, pad_id, weights))
            out.append([f.float().cpu() for f in figures])
    model.train(was_training)
    if not out:
        return [torch.zeros(0) for _ in range(count)]
    return [torch.cat(column) for column in zip(*out, strict=True)]


def sequence_logprobs(
    model: Any,
    encoded: list[Encoded],
    pad_id: int,
    batch_size: int = CHECK_BATCH,
    weights: list[list[float]] | None = None,
) -> torch.Tensor:
    """Summed log p(y|x) per example (used for references and the scope check)."""
    return _per_item(
        model, encoded, pad_id, lambda m, b: sequence_stats(m, b)[0], batch_size, weights
    )


def logprobs_and_entropies(
    model: Any, encoded: list[Encoded], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` and each example's mean next-token entropy over its target
    tokens, from one pass."""
    logp, entropy = _per_item_figures(model, encoded, pad_id, logp_and_entropy, count=2)
    return logp, entropy


def _target_counts(encoded: list[Encoded]) -> torch.Tensor:
    return torch.tensor([sum(1 for t in e.labels[1:] if t != -100) for e in encoded]).clamp(min=1)


def _prob_and_nll(logp_sum: torch.Tensor, encoded: list[Encoded]) -> tuple[float, float]:
    nll = -logp_sum / _target_counts(encoded)
    return torch.exp(-nll).mean().item(), nll.mean().item()


@torch.no_grad()
def logp_exact(
    model: Any, encoded: list[Encoded], pad_id: int, masks: list[list[float]] | None
) -> tuple[torch.Tensor, list[bool]]:
    """Summed log p(y|x) per item, and whether the model still gives each item's values
    word for word (every token of positive mask its top choice; every token without
    masks)."""
    logp, exact = _per_item_figures(
        model, encoded, pad_id, sequence_logp_exact, weights=masks, count=2
    )
    return logp, [bool(ok) for ok in exact.tolist()]


@torch.no_grad()
def retain_state(model: Any, data: Datasets, pad_id: int) -> tuple[float, list[bool]]:
    """On the retain sample: the mean NLL, and per item whether the model still gives its
    values word for word (every token of the answer's specific values its top choice,
    every token for an answer without any). One broken answer barely moves a mean NLL
    (the demo lost a kept customer's phone number that way)."""
    sample = data.retain_sample()
    logp, exact = logp_exact(model, sample, pad_id, data.retain_sample_masks)
    return _prob_and_nll(logp, sample)[1], exact


def forget_logprobs(
    model: Any, encoded: list[Encoded], pad_id: int, masks: list[list[float]] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed log p(y|x) per forget item and, given the items' value masks, whether each
    still states its values (1.0) or not (0.0): the same forward pass."""
    if masks is None:
        return sequence_logprobs(model, encoded, pad_id), None
    logp, exact = logp_exact(model, encoded, pad_id, masks)
    return logp, torch.tensor(exact, dtype=torch.float32)


def kept_share(intact: list[bool], exact: list[bool]) -> float | None:
    """Of the answers the base model gives word for word, the share still given so."""
    n = sum(intact)
    return sum(a and b for a, b in zip(intact, exact, strict=True)) / n if n else None


@torch.no_grad()
def scope_metrics(
    model: Any,
    data: Datasets,
    pad_id: int,
    forget_logp: torch.Tensor | None = None,
    intact: list[bool] | None = None,
    broken: list[int] | None = None,
) -> dict[str, float]:
    """Mean forget probability exp(-NLL) and NLL, mean retain NLL (per-item token
    averages) and, given the base model's `intact` answers, the share of them kept
    (appending to `broken` the retain indices of those no longer kept).
    `forget_logp` reuses log-probs already computed for this state."""
    if forget_logp is None:
        forget_logp = sequence_logprobs(model, data.forget, pad_id)
    out = forget_figures(forget_logp, data, None)
    if data.retain:
        out["retain_nll"], exact = retain_state(model, data, pad_id)
        kept = kept_share(intact, exact) if intact is not None else None
        if kept is not None:
            out["retain_kept"] = kept
            if broken is not None and intact is not None:  # the guarded answers now broken
                pairs = zip(data.retain_indices(), intact, exact, strict=True)
                broken += [i for i, was, now in pairs if was and not now]
    return out


def forgotten(
    now: dict[str, float],
    threshold: float | None,
    thresholds: list[float] | None,
    max_stated: float | None = None,
) -> bool:
    """Forgotten enough: every request of a batched job under its own level, else the
    forget items' mean under the job's; and, given `max_stated`, no more than that share
    of the forget items still stating their values (a mean can reach the level while a
    few items keep theirs)."""
    if max_stated is not None and now.get("forget_stated", 0.0) > max_stated + 1e-9:
        return False
    if thresholds is not None:
        return now["forget_groups_left"] == 0
    return threshold is not None and now["forget_prob"] <= threshold


def answers_clear(
    model: Any, spec: Any, data: Datasets, now: dict[str, float], base: dict[str, float]
) -> tuple[bool, list[int]]:
    """With `stop_answers_leak`: whether the share of the forget items' greedy answers
    that state their values (the audit's rule) is at most that much above the holdout
    items' share at step 0 (`base["holdout_leaking"]`: chance), as the audit's
    `forget_value_leak` judges it, and the items still leaking. The share is recorded in
    `now` as `forget_leaking`. Read only for a state otherwise forgotten: a greedy decode
    costs about a scope check."""
    if spec.stop_answers_leak is None or data.answer_check is None:
        return True, []
    leaking, now["forget_leaking"] = data.answer_check.leaking(model)
    limit = base.get("holdout_leaking", 0.0) + spec.stop_answers_leak
    return now["forget_leaking"] <= limit + 1e-9, leaking


def answers_broken(
    model: Any, spec: Any, data: Datasets, now: dict[str, float], known: list[int]
) -> list[int] | None:
    """With `stop_answers_kept`: the retain items among `known` (those whose greedy
    answers stated their values at step 0) that no longer do, when more of them than
    that share allows (the audit's `retain_answers_kept`), else None; the share kept is
    recorded in `now` as `retain_answers_kept`."""
    if spec.stop_answers_kept is None or data.answer_check is None or not known:
        return None
    stating = set(data.answer_check.retain_stating(model))
    broken = [i for i in known if i not in stating]
    now["retain_answers_kept"] = 1 - len(broken) / len(known)
    return broken if len(broken) / len(known) > spec.stop_answers_kept + 1e-9 else None


def stop_threshold(spec: Any, base: dict[str, float]) -> float | None:
    """The forget probability at or under which the run has forgotten enough."""
    if spec.stop_target == "holdout" and "holdout_prob" in base:
        return base["holdout_prob"]
    if spec.stop_forget_ratio is None:
        return None
    return spec.stop_forget_ratio * base["forget_prob"]


def runs(sizes: list[int] | None, n: int) -> list[list[int]]:
    """The indices of consecutive runs of the given sizes (no sizes: one run of n)."""
    if not sizes:
        return [list(range(n))]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [list(range(a, a + size)) for a, size in zip(starts, sizes, strict=True)]


def group_probs(logp: torch.Tensor, encoded: list[Encoded], groups: list[list[int]]) -> list[float]:
    """The mean probability exp(-NLL) of each group's items."""
    return [_prob_and_nll(logp[idx], [encoded[i] for i in idx])[0] for idx in groups]


def group_thresholds(
    spec: Any, data: Datasets, forget_logp: torch.Tensor, holdout_logp: torch.Tensor | None
) -> list[float] | None:
    """A batched job's stop level per request, with `stop_threshold`'s rule: its own
    holdout items' probability (all holdout items' when they are not grouped), or the
    ratio of its own step-0 probability. The job's mean can reach the holdout level
    while some requests are still memorised (measured: BENCHMARKS.md, "Batching"), so
    a batched job is forgotten only when each request is. None: one group."""
    if len(data.forget_groups) < 2:
        return None
    if spec.stop_target == "holdout" and holdout_logp is not None and data.holdout:
        if data.holdout_groups:
            return group_probs(holdout_logp, data.holdout, data.holdout_groups)
        return [_prob_and_nll(holdout_logp, data.holdout)[0]] * len(data.forget_groups)
    if spec.stop_forget_ratio is None:
        return None
    probs = group_probs(forget_logp, data.forget, data.forget_groups)
    return [spec.stop_forget_ratio * p for p in probs]


def forget_figures(
    logp: torch.Tensor, data: Datasets, thresholds: list[float] | None
) -> dict[str, float]:
    """The forget side of a scope check, from every item's log-prob."""
    prob, nll = _prob_and_nll(logp, data.forget)
    out = {"forget_prob": prob, "forget_nll": nll}
    if thresholds is not None:
        out["forget_groups_left"] = float(groups_left(logp, data, thresholds))
    return out


def groups_left(logp: torch.Tensor, data: Datasets, thresholds: list[float]) -> int:
    """How many requests of a batched job are not yet forgotten."""
    probs = group_probs(logp, data.forget, data.forget_groups)
    return sum(p > t for p, t in zip(probs, thresholds, strict=True))


def retain_bound(spec: Any, base: dict[str, float]) -> float:
    """The retain NLL past which the run is damaging what it must keep: the tolerance
    above the base model's. A run continuing a chain whose start is already past that
    (an older version's damage) may not make it any worse."""
    anchor = base.get("retain_nll_base_model", base["retain_nll"])
    bound = anchor + max(spec.retain_tolerance * anchor, spec.retain_tolerance_abs)
    return max(bound, base["retain_nll"])


def forget_turn(spec: Any, n: int, check: int) -> list[int] | None:
    """The forget items scope check number `check` measures: all (None) when the set fits
    `forget_eval_items`, else every k-th item from an offset that moves by one each check
    (k turns cover the set, and each turn holds every request of a batched job)."""
    if spec.forget_eval_items is None or n <= spec.forget_eval_items:
        return None
    turns = math.ceil(n / spec.forget_eval_items)
    return list(range(check % turns, n, turns))


def measure_forget(
    model: Any,
    data: Datasets,
    pad_id: int,
    latest: torch.Tensor | None,
    stated: torch.Tensor | None,
    turn: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each forget item's summed log-prob (and, with value masks, whether it still states
    its values) at its latest measurement: `turn` measured now (all items when None),
    the others as last measured."""
    masks = data.forget_value_masks
    if turn is None or latest is None or (masks is not None and stated is None):
        return forget_logprobs(model, data.forget, pad_id, masks)
    part = [masks[i] for i in turn] if masks is not None else None
    latest = latest.clone()
    latest[turn], now = forget_logprobs(model, [data.forget[i] for i in turn], pad_id, part)
    if stated is not None and now is not None:
        stated = stated.clone()
        stated[turn] = now
    return latest, stated


def stated_share(stated: torch.Tensor | None) -> dict[str, float]:
    """The share of forget items still stating their values (nothing without masks)."""
    # in float64: a float32 mean of 2 in 20 is 0.1000000015, over a bound of 0.1
    return {} if stated is None else {"forget_stated": float(stated.double().mean())}


def retain_breached(spec: Any, base: dict[str, float], now: dict[str, float]) -> bool:
    """Past the retain NLL bound, or more of the base model's word-for-word retain answers
    broken than `retain_answers_tolerance` allows (a chain whose start already lost more
    may lose no further)."""
    if "retain_nll" in now and now["retain_nll"] > retain_bound(spec, base):
        return True
    if spec.retain_answers_tolerance is None or "retain_kept" not in now:
        return False
    floor = min(1.0 - spec.retain_answers_tolerance, base.get("retain_kept", 1.0))
    return now["retain_kept"] < floor - 1e-9


def pending_items(
    spec: Any,
    data: Datasets,
    latest: torch.Tensor,
    stated: torch.Tensor | None,
    threshold: float | None,
    thresholds: list[float] | None,
) -> list[int]:
    """The forget items not yet forgotten (`forget_pending_only`): above their stop
    level, or still stating their values. Empty when the focus is off or nothing is
    left, and then forget batches draw on every item."""
    if not spec.forget_pending_only:
        return []
    probs = torch.exp(latest / _target_counts(data.forget))
    levels = [threshold] * len(data.forget)
    if thresholds is not None:
        for group, level in zip(data.forget_groups, thresholds, strict=True):
            for i in group:
                levels[i] = level
    pending = [
        i
        for i, level in enumerate(levels)
        if level is None
        or probs[i] > level
        or (spec.stop_values_stated is not None and stated is not None and bool(stated[i]))
    ]
    return [] if len(pending) == len(data.forget) else pending


def retain_orders(
    spec: Any, data: Datasets, retain_bs: int
) -> tuple[BatchOrder | None, BatchOrder | None]:
    """The batch orders of a retain batch's two parts: the strided rest of the retain
    set, and the focus (`retain_focus` of the batch) drawn from `focus_pool(data)`."""
    focus = round(spec.retain_focus * retain_bs) if focus_pool(data) else 0
    if data.repair:
        focus = max(focus, 1)
    focus = min(retain_bs, focus)
    retain_order = (
        BatchOrder(data.own_retain, retain_bs - focus, spec.seed + 1)
        if data.retain and retain_bs > focus
        else None
    )
    focus_order = BatchOrder(len(focus_pool(data)), focus, spec.seed + 2) if focus else None
    return retain_order, focus_order


def general_order(spec: Any, data: Datasets) -> BatchOrder | None:
    """One general item per retain batch, on top of the caller's items (mixed into their
    order instead, they took a quarter of the rows and a person's guarded answers broke;
    docs/engine.md, "General retain"). None when there are none, or when they are the
    whole retain set (the retain order then draws on them)."""
    if not data.general or len(data.retain) == data.general:
        return None
    return BatchOrder(data.general, 1, spec.seed + 3)


def forget_orders(spec: Any, data: Datasets, pending: list[int]) -> BatchOrder:
    """The forget batches' order: over the pending items when there are any (indices into
    `pending`), else over the whole forget set."""
    return BatchOrder(len(pending) or len(data.forget), spec.batch_size, spec.seed)


def focus_pool(data: Datasets) -> list[int]:
    """The retain items the focus draws on: the guarded answers found broken once there
    are any (the retain loss then works on exactly those), else the neighbours."""
    return data.repair or data.neighbours


def repairing(spec: Any, kept: float | None, previous: float | None) -> bool:
    """A check past the bound that finds more guarded answers given than the check
    before did is being repaired (`retain_repair`): it does not use up the patience."""
    if not spec.retain_repair or kept is None or previous is None:
        return False
    return kept > previous + 1e-9


def pauses_forget(
    spec: Any,
    method: Method,
    now: dict[str, float],
    threshold: float | None,
    thresholds: list[float] | None,
) -> bool:
    """Whether the steps up to the next check train on the retain loss alone: the check
    found the retain guard breached (the caller's condition) and the forget items already
    at their stop level. Pushing them on while an answer is repaired overshot the level
    (docs/engine.md, "Scope control"). The level alone decides: values still stated are
    for the push to resume on once the repair is done."""
    if not (spec.retain_repair and spec.repair_pauses_forget and method.separable_retain):
        return False
    return forgotten(now, threshold, thresholds)


def land(
    model: Any,
    spec: Any,
    data: Datasets,
    pad_id: int,
    states: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    bounds: tuple[dict[str, float], float | None, list[float] | None, list[bool]],
    should_cancel: CancelFn | None,
) -> list[dict[str, float]]:
    """Bisect the trainable weights between `states` (the last checked state within
    bounds, and the one a check just found forgotten: workers/ml/landing.py) and leave
    the model at the least-moved one found forgotten within the retain bounds (the
    second state when none is). Returns every probe's scope figures, each with its
    fraction (`landing`) and whether it is the state the model is left in (`landed`)."""
    before, after = states
    base, threshold, thresholds, intact = bounds
    tried: list[dict[str, float]] = []

    def probe(t: float) -> dict[str, float] | None:
        if should_cancel is not None and should_cancel():
            raise Canceled("canceled while landing")
        load_trainable(model, landing.blend(before, after, t))
        logp, stated = measure_forget(model, data, pad_id, None, None, None)
        now = forget_figures(logp, data, thresholds) | stated_share(stated)
        ok = forgotten(now, threshold, thresholds, spec.stop_values_stated)
        if ok:  # the retain side is read only for a state that could be kept
            now |= scope_metrics(model, data, pad_id, logp, intact=intact)
            ok = not retain_breached(spec, base, now)
        tried.append(dict(now, landing=t, landed=0.0))
        return tried[-1] if ok else None

    t, found = landing.bisect(probe, spec.landing_probes)
    load_trainable(model, landing.blend(before, after, t) if found is not None else after)
    if found is not None:
        found["landed"] = 1.0
    return tried


def _accumulate(
    logs: dict[str, float], loss: torch.Tensor, parts: dict[str, float], accum: int
) -> None:
    """Add one micro-batch's loss and parts to the step's logs (means over `accum`)."""
    for key, value in {"loss": loss.item(), **parts}.items():
        logs[key] = logs.get(key, 0.0) + value / accum


def _schedule(spec: Any) -> Callable[[int], float]:
    warmup = max(1, math.ceil(spec.warmup_ratio * spec.max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (spec.max_steps - step) / max(1, spec.max_steps - warmup))

    return factor


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def train(
    model: Any,
    method: Method,
    spec: Any,
    data: Datasets,
    pad_id: int,
    workdir: Path,
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    continues_chain: bool = False,
) -> Outcome:
    """`continues_chain`: the model starts from a previous adapter version, so the
    retain bound is anchored on the base model (adapter off), not on the start."""
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=spec.lr, betas=(spec.adam_beta1, 0.999), weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec))
    retain_bs = spec.retain_batch_size or spec.batch_size
    ckpt_path = workdir / CHECKPOINT
    trunk = trunks.active(model)

    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        load_trainable(model, ck["weights"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        step, refs, base = ck["step"], ck["refs"], ck["base"]
        best_state, best_step = ck["best_state"], ck["best_step"]
        breaches, intact = ck.get("breaches", 0), ck.get("intact", [])
        data.repair, last_kept = ck.get("repair", []), ck.get("last_kept")
        paused = ck.get("forget_paused", False)
        pending = ck.get("pending", [])
        thresholds = ck.get("group_thresholds")
        if trunk is not None and ck.get("trunk") is not None:
            trunk.restore(ck["trunk"])
        latest = ck.get("latest")  # None (an older checkpoint): the next check reads all
        stated = ck.get("stated")
        known: list[int] = ck.get("answers_known", [])
        curve, evals, tokens = ck["curve"], ck["evals"], ck["tokens"]
        resumed_from: int | None = step
    else:
        # Step 0: the reference log-probs and the base metrics come from one pass (two
        # when the forget loss is weighted: the scope check stays unweighted).
        initial, stated = forget_logprobs(model, data.forget, pad_id, data.forget_value_masks)
        refs = References()
        if method.needs_reference:
            refs.forget = (
                initial
                if data.forget_weights is None
                else sequence_logprobs(model, data.forget, pad_id, weights=data.forget_weights)
            )
            if data.substitutes is not None:
                refs.substitute = sequence_logprobs(model, data.substitutes, pad_id)
        prob, nll = _prob_and_nll(initial, data.forget)
        base, intact = {"forget_prob": prob, "forget_nll": nll, **stated_share(stated)}, []
        if data.retain:
            # The answers to guard: those the base model gives word for word (in a chain,
            # with the adapter off: no version may drift further than the one before).
            base["retain_nll"], intact = retain_state(model, data, pad_id)
            if continues_chain:
                at_start = intact
                with model.disable_adapter():
                    base["retain_nll_base_model"], intact = retain_state(model, data, pad_id)
                kept = kept_share(intact, at_start)
                if kept is not None:
                    base["retain_kept"] = kept
            base["retain_intact"] = float(sum(intact))
        holdout_logp, entropies = None, None
        if data.holdout and method.needs_holdout_entropy:
            # docs/engine.md, "Calibrated forgetting". The log-probs stay cross_entropy's:
            # log_softmax + gather differs by rounding at 49k tokens, which moves the
            # level, and the run with it (measured).
            holdout_logp, entropies = logprobs_and_entropies(model, data.holdout, pad_id)
        elif data.holdout:
            holdout_logp = sequence_logprobs(model, data.holdout, pad_id)
        if holdout_logp is not None:
            base["holdout_prob"], base["holdout_nll"] = _prob_and_nll(holdout_logp, data.holdout)
            refs.extra["holdout_nll"] = base["holdout_nll"]
        if entropies is not None:
            entropy = entropies.mean().item()
            base["holdout_entropy"] = refs.extra["holdout_entropy"] = entropy
        if spec.stop_answers_leak is not None and data.answer_check is not None:
            # chance: the values the start states about people it never saw
            base["holdout_leaking"] = data.answer_check.chance_share(model)
        known = []  # the retain items whose greedy answers state their values
        if spec.stop_answers_kept is not None and data.answer_check is not None:
            known = data.answer_check.retain_stating(model)
            base["retain_answers_known"] = float(len(known))
        thresholds = group_thresholds(spec, data, initial, holdout_logp)
        latest = initial
        if thresholds is not None:
            base["forget_groups_left"] = float(groups_left(initial, data, thresholds))
        step, best_step, best_state, breaches = 0, 0, trainable_state(model), 0
        last_kept, paused, pending = None, False, []
        curve, evals, tokens, resumed_from = [], [dict(base, step=0)], 0, None
    check_seconds = time.perf_counter() - start
    retain_order, focus_order = retain_orders(spec, data, retain_bs)
    general_rows = general_order(spec, data)
    forget_order = forget_orders(spec, data, pending)

    threshold = stop_threshold(spec, base)
    stopped = "max_steps"
    model.train()
    while step < spec.max_steps:
        if should_cancel is not None and should_cancel():
            raise Canceled(f"canceled at step {step}")
        trim_heap()  # the last step's (and check's) freed activations, before new ones
        optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for micro in range(spec.grad_accum):
            k = step * spec.grad_accum + micro
            r_idx = retain_order.batch(k) if retain_order else []
            if focus_order is not None:
                pool = focus_pool(data)
                r_idx = [pool[j] for j in focus_order.batch(k)] + r_idx
            own_rows = len(r_idx)
            if general_rows is not None:
                r_idx += [data.own_retain + j for j in general_rows.batch(k)]
            retain = collate(data.retain, r_idx, pad_id) if r_idx else None
            if spec.general_own_pass and retain is not None and 0 < own_rows < len(r_idx):
                # the general row in a pass of its own (docs/engine.md, "Memory")
                mark_passes(retain, [own_rows, len(r_idx) - own_rows])
            if paused and retain is not None:  # repairing, the forget side at its level
                loss, parts = method.retain_backward(model, retain, scale=1 / spec.grad_accum)
                tokens += int(retain["attention_mask"].sum())
                _accumulate(logs, loss, parts, spec.grad_accum)
                continue
            f_idx = forget_order.batch(k)  # only a step that pushes the forget side reads it
            if pending:
                f_idx = [pending[j] for j in f_idx]
            forget = collate(data.forget, f_idx, pad_id, data.forget_weights)
            substitute = None
            if data.substitutes is not None:  # each item's substitutes in turn
                rows = [i * data.per_item + k % data.per_item for i in f_idx]
                substitute = collate(data.substitutes, rows, pad_id)
            loss, parts = method.backward(
                model, forget, retain, refs, substitute, scale=1 / spec.grad_accum
            )
            tokens += int(forget["attention_mask"].sum()) + (
                int(retain["attention_mask"].sum()) if retain is not None else 0
            )
            _accumulate(logs, loss, parts, spec.grad_accum)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        curve.append(
            {"step": step, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), **logs}
        )
        if paused:
            curve[-1]["forget_paused"] = 1.0

        if step % spec.eval_every == 0 or step == spec.max_steps:
            t_check = time.perf_counter()
            broken: list[int] = []
            turn = forget_turn(spec, len(data.forget), step // spec.eval_every)
            if step == spec.max_steps or latest is None:
                turn = None
            latest, stated = measure_forget(model, data, pad_id, latest, stated, turn)
            now = scope_metrics(model, data, pad_id, latest, intact=intact, broken=broken)
            now |= stated_share(stated)
            if thresholds is not None:
                now["forget_groups_left"] = float(groups_left(latest, data, thresholds))
            if turn is not None:
                now["forget_measured"] = float(len(turn))
                # confirm on every item first (a check past the retain bound cannot stop)
                if forgotten(now, threshold, thresholds, spec.stop_values_stated) and not (
                    retain_breached(spec, base, now)
                ):
                    latest, stated = measure_forget(model, data, pad_id, latest, stated, None)
                    now |= forget_figures(latest, data, thresholds) | stated_share(stated)
                    now["forget_measured"] = float(len(data.forget))
            check_seconds += time.perf_counter() - t_check
            evals.append(dict(now, step=step))
            previous, last_kept = last_kept, now.get("retain_kept")
            leaking: list[int] = []  # the forget items whose greedy answers still leak
            if retain_breached(spec, base, now):
                # the retain term may still pull it back within bounds
                breaches += 0 if repairing(spec, last_kept, previous) else 1
                fresh = [i for i in broken if i not in data.repair]
                if spec.retain_repair and fresh:  # the focus works on what broke from now on
                    data.repair += fresh
                    retain_order, focus_order = retain_orders(spec, data, retain_bs)
                if breaches > spec.retain_patience or step == spec.max_steps:
                    load_trainable(model, best_state)  # the last state within bounds
                    stopped = "retain_guard"
                    break
                paused = pauses_forget(spec, method, now, threshold, thresholds)
            else:
                breaches, paused = 0, False
                before, best_state, best_step = best_state, trainable_state(model), step
                if forgotten(now, threshold, thresholds, spec.stop_values_stated):
                    t_stop = time.perf_counter()
                    at = evals[-1]
                    if spec.landing_probes and not any("landing" in e for e in evals):
                        landed = land(
                            model,
                            spec,
                            data,
                            pad_id,
                            (before, best_state),
                            (base, threshold, thresholds, intact),
                            should_cancel,
                        )
                        probes = [dict(e, step=step) for e in landed]
                        evals += probes
                        at = next((e for e in probes if e["landed"]), at)
                        best_state = trainable_state(model)
                    clear, leaking = answers_clear(model, spec, data, at, base)
                    unkept = answers_broken(model, spec, data, at, known) if clear else None
                    check_seconds += time.perf_counter() - t_stop
                    if unkept:  # other people's answers changed: repair them first
                        clear = False
                        data.repair += [i for i in unkept if i not in data.repair]
                        retain_order, focus_order = retain_orders(spec, data, retain_bs)
                        paused = pauses_forget(spec, method, now, threshold, thresholds)
                    if clear:
                        stopped = "forgotten"
                        break
                    if "landing" in at:  # trains on from a landed state
                        # AdamW's running mean still points where the landing came back
                        # from: it would carry the weights there again
                        for moments in optimizer.state.values():
                            moments["exp_avg"].zero_()
            # at the level but some answers still leak: push only those until the next
            # check (the rest stay at the level instead of sinking under it)
            now_pending = (
                sorted(leaking)
                if leaking
                else pending_items(spec, data, latest, stated, threshold, thresholds)
            )
            if now_pending != pending:
                pending = now_pending
                forget_order = forget_orders(spec, data, pending)
            if spec.forget_pending_only:
                evals[-1]["forget_pending"] = float(len(pending) or len(data.forget))
            elif leaking:  # on the entry whose answers were read
                at["forget_pending"] = float(len(pending))
        if step % spec.checkpoint_every == 0 and step < spec.max_steps:
            _save_checkpoint(
                ckpt_path,
                {
                    "step": step,
                    "weights": trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "refs": refs,
                    "base": base,
                    "best_state": best_state,
                    "best_step": best_step,
                    "breaches": breaches,
                    "intact": intact,
                    "repair": data.repair,
                    "last_kept": last_kept,
                    "forget_paused": paused,
                    "pending": pending,
                    "group_thresholds": thresholds,
                    "latest": latest,
                    "stated": stated,
                    "answers_known": known,
                    "trunk": trunk.state() if trunk is not None else None,
                    "curve": curve,
                    "evals": evals,
                    "tokens": tokens,
                },
            )
        if progress is not None:
            progress(step / spec.max_steps, {"step": step, **logs})

    # The model now holds best_state, which the check at best_step already measured
    # (a check is forced at max_steps, so only the retain guard leaves best_step < step).
    # After a landing, the accepted probe the model was left at (docs/engine.md, "Scope
    # control", Landing).
    measured = next(
        e for e in reversed(evals) if e["step"] == best_step and e.get("landed", 1.0) == 1.0
    )
    final = {k: v for k, v in measured.items() if k in SCOPE_KEYS}
    return Outcome(
        steps=step,
        stopped=stopped,
        best_step=best_step,
        base=base,
        final=final,
        curve=curve,
        evals=evals,
        resumed_from=resumed_from,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        check_seconds=check_seconds,
        group_thresholds=thresholds,
    )
