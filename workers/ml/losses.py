"""Per-example log-likelihoods and the retain terms shared by the methods.

Logits are computed only at the positions that predict a target token (transformers'
boolean `logits_to_keep`): the vocabulary projection is the largest activation of a
small model, and prompt positions never need it. Architectures without that argument
fall back to full logits.

A batch's common prefix (a chat template's system prompt and role header: a third of
each short item's tokens) goes through the network once and its keys and values are
repeated over the batch: causal attention makes the prefix's states the same in every
row, so the logits and gradients are those of the full batch (up to rounding) for a
fraction of the compute and activation memory. Each model class is checked once
against the plain forward; a class that differs, or takes no cache, is not shared.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from workers.ml import trunk as trunks
from workers.ml.data import IGNORE, passes

_NO_KEEP: set[tuple[type, type]] = set()  # _kind()s that ignore or refuse boolean logits_to_keep
# (_kind(), compute dtype) -> its shared-prefix forward checked
_SHARED_PREFIX: dict[tuple[tuple[type, type], torch.dtype], bool] = {}
# (_kind(), compute dtype, prefix shared) -> its frozen-trunk forward checked (trunk.py)
_TRUNK: dict[tuple[tuple[type, type], torch.dtype, bool], bool] = {}
MIN_SHARED = 8  # tokens: a shorter common prefix is not worth a second forward call
# UNLEARN_SHARED_PREFIX=0 switches the sharing off (benchmarks compare the two)
SHARE_PREFIX = os.environ.get("UNLEARN_SHARED_PREFIX", "1") != "0"
SHARE_TOLERANCE = 1e-3  # max |logit difference| of the check (float32 rounding is ~1e-5)
# In 16-bit compute every layer rounds its output, and the two paths differ by up to a few
# percent of the largest logit (SmolLM2 in bfloat16: 0.93 of 39.6 at most, 0.14 on average,
# every top choice the same): the check then allows 5 % and asks for the same top choices.
SHARE_TOLERANCE_16BIT = 0.05
SHARE_MIN_ARGMAX_AGREEMENT = 0.98


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


def _keep_mask(labels: torch.Tensor) -> torch.Tensor:
    """Position t is kept when it predicts a target token (labels[t + 1])."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def _kind(model: Any) -> tuple[type, type]:
    """A model's class and, under a PEFT wrapper, the wrapped architecture's: one PEFT
    class wraps them all, and what the checks below learn is per architecture."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(model), type(base)


def _plain_logits(model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    kind = _kind(model)
    if kind not in _NO_KEEP:
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
            if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
                return logits
        except TypeError:
            pass
        _NO_KEEP.add(kind)
    return model(**inputs).logits[keep]


def shared_prefix_length(input_ids: torch.Tensor, keep: torch.Tensor) -> int:
    """How many leading tokens every row has in common, none of them a kept position
    (0 for a single row: nothing to share)."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    common = int(same.long().cumprod(0).sum())
    first_kept = int(keep.long().argmax(dim=1).min()) if bool(keep.any()) else common
    return min(common, first_kept, input_ids.shape[1] - 1)


# Within `reusing_prefix()`: the prefix's keys and values by its tokens (see there)
_REUSE: ContextVar[dict[tuple[tuple[int, ...], tuple[int, ...]], Any] | None] = ContextVar(
    "prefix_reuse", default=None
)


@contextmanager
def reusing_prefix() -> Iterator[None]:
    """Within the block, a batch whose common prefix an earlier batch of the block already
    ran reuses that pass's keys and values (a copy) instead of running it again: for
    passes without gradients over weights that do not change inside the block (a scope
    check's batches). The same tensors, so the same numbers bit for bit."""
    token = _REUSE.set({})
    try:
        yield
    finally:
        _REUSE.reset(token)


def _prefix_cache(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """The keys and values of one row of prefix tokens (a fresh cache object the caller
    may extend)."""
    store = _REUSE.get()
    key = None
    if store is not None and not torch.is_grad_enabled():
        key = (tuple(ids[0].tolist()), tuple(mask[0].tolist()))
        if key in store:
            return copy.deepcopy(store[key])
    # only its keys and values are used: logits at one position, not the prefix's 24
    # (a vocabulary-sized product per position)
    head = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache = head.cache  # transformers 5: `cache` (formerly past_key_values)
    if key is not None and store is not None:
        store[key] = copy.deepcopy(cache)
    return cache


def _prefix_logits(
    model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor, p: int
) -> torch.Tensor:
    """The kept logits with the first `p` tokens (the same in every row) run once."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = _prefix_cache(model, ids[:1, :p], mask[:1, :p])
    cache.batch_repeat_interleave(ids.shape[0])
    rest = model(
        input_ids=ids[:, p:],
        attention_mask=mask,
        cache=cache,
        use_cache=True,
        logits_to_keep=keep[:, p:],
    ).logits
    if rest.dim() != 2 or rest.shape[0] != int(keep.sum()):
        raise TypeError("boolean logits_to_keep not honoured")
    return rest


def _share_key(model: Any) -> tuple[tuple[type, type], torch.dtype]:
    return _kind(model), _compute_dtype(model)


def _compute_dtype(model: Any) -> torch.dtype:
    """The dtype of the frozen weights (LoRA weights stay float32 under 16-bit ones)."""
    frozen = (p.dtype for p in model.parameters() if not p.requires_grad)
    return next(frozen, next(model.parameters()).dtype)


def same_logits(shared: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether two paths' logits agree up to the compute dtype's rounding."""
    shared, plain = shared.float(), plain.float()
    diff = float((shared - plain).abs().max())
    if dtype == torch.float32 or dtype == torch.float64:
        return diff <= SHARE_TOLERANCE
    agree = float((shared.argmax(-1) == plain.argmax(-1)).float().mean())
    return (
        diff <= SHARE_TOLERANCE_16BIT * float(plain.abs().max())
        and agree >= SHARE_MIN_ARGMAX_AGREEMENT
    )


def _agrees_once(
    store: dict[Any, bool],
    key: Any,
    model: Any,
    inputs: dict[str, torch.Tensor],
    keep: torch.Tensor,
    path: Callable[[], torch.Tensor],
) -> bool:
    """Whether `path`'s kept logits equal the plain forward's up to the compute dtype's
    rounding: checked once per `key` (a model class and dtype), the verdict kept."""
    if key not in store:
        try:
            with torch.no_grad():
                ok = same_logits(path(), _plain_logits(model, inputs, keep), _compute_dtype(model))
        except (TypeError, ValueError, AttributeError, RuntimeError, IndexError):
            ok = False
        store[key] = ok
    return store[key]


def _can_share(model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor, p: int) -> bool:
    """The shared-prefix logits equal the plain ones (once per class and dtype)."""
    return _agrees_once(
        _SHARED_PREFIX,
        _share_key(model),
        model,
        inputs,
        keep,
        lambda: _prefix_logits(model, inputs, keep, p),
    )


def _sharing_allowed(model: Any) -> bool:
    """Not switched off, and no gradient checkpointing: transformers drops the cache
    inside checkpointed layers, so sharing would be wrong there."""
    if not SHARE_PREFIX:
        return False
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new, old
        if hasattr(type(model), name) or hasattr(model, name):
            return not getattr(model, name)
    return True


def shared_prefix_used(model: Any) -> bool:
    """Whether this model's batches went through the shared-prefix forward (its check
    ran and passed, and nothing switched it off)."""
    return _sharing_allowed(model) and _SHARED_PREFIX.get(_share_key(model), False)


@contextmanager
def prefix_sharing(enabled: bool) -> Iterator[None]:
    """Switch the shared-prefix forward on or off within the block."""
    global SHARE_PREFIX
    before, SHARE_PREFIX = SHARE_PREFIX, enabled
    try:
        yield
    finally:
        SHARE_PREFIX = before


def _trunk_agrees(
    model: Any,
    trunk: trunks.Trunk,
    inputs: dict[str, torch.Tensor],
    keep: torch.Tensor,
    shared: int,
) -> bool:
    """Logits from the frozen trunk's kept output (with the first `shared` tokens run
    once, or none) equal the plain forward's: once per class, dtype and variant."""
    return _agrees_once(
        _TRUNK,
        (*_share_key(model), shared > 0),
        model,
        inputs,
        keep,
        lambda: trunk.logits(inputs, keep, shared),
    )


def trunk_paths(model: Any) -> dict[str, bool]:
    """Which of the frozen trunk's paths this model's class and dtype passed its check
    with: plain rows, and rows behind a shared prefix."""
    key = _share_key(model)
    return {
        "used": _TRUNK.get((*key, False), False) or _TRUNK.get((*key, True), False),
        "shared_prefix": _TRUNK.get((*key, True), False),
    }


def kept_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] at the kept positions (row-major order) and the targets [N]."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    labels = batch["labels"].to(device)
    keep = _keep_mask(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    p = shared_prefix_length(inputs["input_ids"], keep)
    trunk = trunks.active(model)
    if trunk is not None:
        shared = p if p >= MIN_SHARED and _sharing_allowed(model) else 0
        if shared and _trunk_agrees(model, trunk, inputs, keep, shared):
            return trunk.logits(inputs, keep, shared), targets
        if _trunk_agrees(model, trunk, inputs, keep, 0):
            return trunk.logits(inputs, keep), targets
    if p >= MIN_SHARED and _sharing_allowed(model) and _can_share(model, inputs, keep, p):
        return _prefix_logits(model, inputs, keep, p), targets
    return _plain_logits(model, inputs, keep), targets


def _rows_and_weights(
    batch: dict[str, torch.Tensor], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch row of every kept target token [N] and its loss weight [N] (the batch's
    "weights", else 1), in `kept_logits`' order."""
    keep = _keep_mask(batch["labels"])
    rows = keep.nonzero()[:, 0].to(like.device)
    if "weights" in batch:
        return rows, batch["weights"][:, 1:][keep[:, :-1]].to(like.device)
    return rows, torch.ones_like(like)


def target_logprobs(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p of every target token [N], the batch row each belongs to [N], and its loss
    weight [N] (the batch's "weights", else 1)."""
    logits, targets = kept_logits(model, batch)
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    return (logp, *_rows_and_weights(batch, logp))


def sequence_stats(
    model: Any, batch: dict[str, torch.Tensor], nll_cap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Weighted) summed log p(y|x) and mean NLL over the target tokens, per example.
    `nll_cap`: each token's NLL counts up to this much (`_capped`)."""
    logp, rows, weights = target_logprobs(model, batch)
    return _per_example(_capped(logp, nll_cap), rows, weights, batch["labels"].shape[0])


def _capped(logp: torch.Tensor, nll_cap: float | None) -> torch.Tensor:
    """log p clamped at -nll_cap: a token already that unlikely adds no gradient, so a
    loss on the mean NLL moves on to the example's other tokens instead of driving one
    position ever surer of some other token (docs/engine.md, "Calibrated forgetting")."""
    return logp if nll_cap is None else logp.clamp(min=-nll_cap)


def _per_example(
    logp: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the weighted sum of `logp` and minus its weighted mean."""
    zeros = torch.zeros(n, device=logp.device, dtype=logp.dtype)
    total = zeros.index_add(0, rows, logp * weights)
    count = zeros.index_add(0, rows, weights).clamp(min=1e-6)
    return total, -total / count


def sequence_stats_entropy(
    model: Any, batch: dict[str, torch.Tensor], nll_cap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sequence_stats`, and each example's mean entropy of the model's next-token
    distribution over its target tokens (unweighted), from the same forward pass.

    The entropy is what Min-K%++ normalises by: a log-probability counts as low only
    against how sure the model is there (docs/engine.md, "Calibrated forgetting")."""
    logits, targets = kept_logits(model, batch)
    lp = F.log_softmax(logits.float(), dim=-1)
    logp = lp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(lp.exp() * lp).sum(dim=-1)
    rows, weights = _rows_and_weights(batch, logp)
    n = batch["labels"].shape[0]
    total, nll = _per_example(_capped(logp, nll_cap), rows, weights, n)
    _, mean_entropy = _per_example(-entropy, rows, torch.ones_like(logp), n)  # -(sum -H)/count
    return total, nll, mean_entropy


def logp_and_entropy(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, `sequence_stats`' summed log p(y|x) and `sequence_stats_entropy`'s
    mean entropy, each computed as there (cross_entropy for the one, log_softmax for the
    other: the same numbers to the last bit) from one forward pass instead of two."""
    logits, targets = kept_logits(model, batch)
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    lp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(lp.exp() * lp).sum(dim=-1)
    rows, weights = _rows_and_weights(batch, logp)
    n = batch["labels"].shape[0]
    total, _ = _per_example(logp, rows, weights, n)
    _, mean_entropy = _per_example(-entropy, rows, torch.ones_like(logp), n)
    return total, mean_entropy


def sequence_logp_exact(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log p(y|x) per example, and whether every target token is the model's top
    choice: then greedy decoding from the prompt gives exactly y (the answer is intact).
    With the batch's "weights", only the tokens of positive weight must be (its values)."""
    logits, targets = kept_logits(model, batch)
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    keep = _keep_mask(batch["labels"])
    miss = logits.argmax(-1) != targets
    if "weights" in batch:
        miss &= batch["weights"][:, 1:][keep[:, :-1]].to(miss.device) > 0
    miss = miss.to(logp.dtype)
    rows = keep.nonzero()[:, 0].to(logp.device)
    zeros = torch.zeros(batch["labels"].shape[0], device=logp.device, dtype=logp.dtype)
    return zeros.index_add(0, rows, logp), zeros.index_add(0, rows, miss) == 0


def mean_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-weighted mean NLL over the batch (the usual language-model loss)."""
    logp, _, weights = target_logprobs(model, batch)
    return -(logp * weights).sum() / weights.sum().clamp(min=1e-6)


KL_ROWS = 32  # positions per chunk of the KL's vocabulary-sized float32 temporaries


class _RowKL(torch.autograd.Function):
    """Per row, sum(p * (log p - ref)) with log p = log_softmax(logits), computed exactly
    as `(cur.exp() * (cur - ref)).sum(-1)` and back-propagated with autograd's own steps
    for it, in its order, so the numbers are the same bit for bit. But it keeps only the
    logits (16-bit in a bfloat16 job) and `ref`, and recomputes log p and p in chunks of
    rows in the backward pass: autograd kept three float32 tensors of the logits' size
    (log p, p, log p - ref) alive through the backward pass, and their gradients on top
    (a retain batch's were a step's largest transient; docs/engine.md, "Memory")."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        kl = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        for s in range(0, logits.shape[0], KL_ROWS):
            cur = F.log_softmax(logits[s : s + KL_ROWS].float(), dim=-1)
            kl[s : s + KL_ROWS] = (cur.exp() * (cur - ref[s : s + KL_ROWS])).sum(dim=-1)
        ctx.save_for_backward(logits, ref)
        return kl

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, ref = ctx.saved_tensors
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], KL_ROWS):
            e = s + KL_ROWS
            cur = F.log_softmax(logits[s:e].float(), dim=-1)
            p = cur.exp()
            g = grad[s:e, None].expand_as(cur)  # SumBackward0
            from_p = g * (cur - ref[s:e])  # MulBackward0, to p
            # MulBackward0 to (cur - ref), through SubBackward0, plus ExpBackward0
            into_cur = g * p + from_p * p
            wide = torch._log_softmax_backward_data(into_cur, cur, -1, torch.float32)
            out[s:e] = wide.to(out.dtype)  # ToCopyBackward0 of .float()
        return out, None


def _kl_rows(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(p || p_ref) at each target position [N]."""
    with torch.no_grad(), model.disable_adapter():
        ref = F.log_softmax(kept_logits(model, batch)[0].float(), dim=-1)
    return _RowKL.apply(kept_logits(model, batch)[0], ref)


def kl_to_reference(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(p || p_ref) on the target positions, the reference being the network with the
    adapter switched off (no second copy of the model)."""
    return _kl_rows(model, batch).mean()


def _retain_count(batch: dict[str, torch.Tensor], kind: str) -> float:
    """What the retain loss of `batch` is the mean over: its target tokens (for NLL their
    weights' sum when the batch has weights)."""
    keep = _keep_mask(batch["labels"])
    if kind == "nll" and "weights" in batch:
        return float(batch["weights"][:, 1:][keep[:, :-1]].sum())
    return float(keep.sum())


def _retain_sum(model: Any, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The retain loss summed over the target tokens of `batch`."""
    if kind == "nll":
        logp, _, weights = target_logprobs(model, batch)
        return -(logp * weights).sum()
    return _kl_rows(model, batch).sum()


def retain_parts(model: Any, batch: dict[str, torch.Tensor], kind: str) -> Iterator[torch.Tensor]:
    """The NLL or KL retain loss (the mean over the batch's target tokens) as the shares
    of its passes (`data.passes`), each computed only when asked for: they add up to the
    loss, and a caller may back-propagate one before the next runs. An unmarked batch is
    one share, the loss itself."""
    groups = passes(batch)
    if len(groups) == 1:
        yield mean_nll(model, batch) if kind == "nll" else kl_to_reference(model, batch)
        return
    count = max(sum(_retain_count(g, kind) for g in groups), 1e-6)
    for group in groups:
        yield _retain_sum(model, group, kind) / count


def retain_loss(model: Any, batch: dict[str, torch.Tensor] | None, kind: str) -> torch.Tensor:
    """NLL or KL retain loss: the mean over the batch's target tokens (0 without a batch),
    every pass's graph alive at once (`Method.retain_backward` back-propagates them in
    turn)."""
    if batch is None:
        return torch.zeros((), device=next(model.parameters()).device)
    parts = list(retain_parts(model, batch, kind))
    return torch.stack(parts).sum()  # one pass: the loss itself, exactly
