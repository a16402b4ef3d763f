"""SimNPO: reference-free NPO on the length-normalised loss,
-(2/beta) * log sigmoid(beta * (NLL_sum/|y| - delta)), plus alpha * retain loss.

Its push on an item fades as the item's mean NLL passes delta; `delta="holdout"` sets
delta to the holdout items' mean NLL, so forget items are pushed to the level of data
the model never saw and no further (over-unlearning is detectable too).
`entropy_match` adds entropy_match * mean (H_i - H_holdout)^2, H an item's mean
next-token entropy: the items end as sure, or unsure, as never-seen ones
(docs/engine.md, "Calibrated forgetting"). `token_nll_cap` counts each token's NLL up
to that much, so the push on an item spreads over its tokens instead of driving a few
ever less likely."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from workers.ml.losses import sequence_stats, sequence_stats_entropy
from workers.ml.methods.base import Batch, Method, References, register
from workers.ml.specs import SimNPO


@register
class SimpleNPO(Method):
    name = "simnpo"
    separable_retain = True
    spec_type = SimNPO

    @property
    def needs_holdout_entropy(self) -> bool:  # type: ignore[override]
        return bool(self.spec.entropy_match > 0)

    def loss(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.spec
        target_entropy = refs.extra.get("holdout_entropy") if self.needs_holdout_entropy else None
        if target_entropy is None:
            _, nll = sequence_stats(model, forget, s.token_nll_cap)  # mean NLL = -(log p)/|y|
        else:
            _, nll, entropy = sequence_stats_entropy(model, forget, s.token_nll_cap)
        delta = refs.extra.get("holdout_nll", 0.0) if s.delta == "holdout" else s.delta
        forget_term = -(2.0 / s.beta) * F.logsigmoid(s.beta * (nll - delta)).mean()
        logs = {"forget_loss": forget_term.item(), "forget_nll": nll.mean().item()}
        if target_entropy is not None:
            # as sure (or unsure) about the person as about people never seen
            calibration = ((entropy - target_entropy) ** 2).mean()
            forget_term = forget_term + s.entropy_match * calibration
            logs["forget_entropy"] = entropy.mean().item()
            logs["forget_loss"] = forget_term.item()
        return self.with_retain(model, retain, forget_term, logs)
