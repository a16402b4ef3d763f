"""NPO: -(2/beta) * log sigmoid(-beta * (log p(y|x) - log p_ref(y|x))) on forget items,
plus alpha * retain loss. Bounded, unlike gradient ascent: once an item is well below
the reference its gradient fades."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from workers.ml.losses import sequence_stats
from workers.ml.methods.base import Batch, Method, References, ref_slice, register
from workers.ml.specs import NPO


def npo_term(logp: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-item NPO loss -(2/beta) * log sigmoid(-beta * (log p - log p_ref))."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref))


@register
class NegativePreference(Method):
    name = "npo"
    separable_retain = True
    spec_type = NPO
    needs_reference = True

    def loss(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.spec
        logp, nll = sequence_stats(model, forget)
        forget_term = npo_term(logp, ref_slice(refs.forget, forget, logp.device), s.beta).mean()
        logs = {"forget_loss": forget_term.item(), "forget_nll": nll.mean().item()}
        return self.with_retain(model, retain, forget_term, logs)
