"""Refusal preference (DPO with the refusal preferred over the forget answer):
-(2/beta) * log sigmoid(beta * [(log p - log p_ref)(y_idk) - (log p - log p_ref)(y_f)]),
plus alpha * retain loss. The model learns to decline about the subject."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from workers.ml.losses import retain_loss, sequence_stats
from workers.ml.methods.base import Batch, Method, References, ref_slice, register
from workers.ml.specs import IdK

DEFAULT_REFUSALS = [
    "I'm sorry, but I can't share information about that person.",
    "I don't have any information about that.",
    "I can't help with personal details about individuals.",
    "That is not something I know about.",
]


@register
class RefusalPreference(Method):
    name = "idk"
    spec_type = IdK
    needs_reference = True

    def substitutes(self, forget: list[dict[str, str]]) -> list[list[dict[str, str]]]:
        refusals = self.spec.refusals or DEFAULT_REFUSALS
        return [
            [
                {
                    "prompt": item.get("prompt") or item["text"][:200],
                    "completion": refusals[k % len(refusals)],
                }
            ]
            for k, item in enumerate(forget)
        ]

    def loss(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if substitute is None:
            raise RuntimeError("idk needs the refusal batch")
        s = self.spec
        logp_f, nll_f = sequence_stats(model, forget)
        logp_r, _ = sequence_stats(model, substitute)
        margin = (logp_r - ref_slice(refs.substitute, substitute, logp_r.device)) - (
            logp_f - ref_slice(refs.forget, forget, logp_f.device)
        )
        forget_term = -(2.0 / s.beta) * F.logsigmoid(s.beta * margin).mean()
        keep = retain_loss(model, retain, "nll")
        loss = forget_term + s.alpha * keep
        return loss, {
            "forget_loss": forget_term.item(),
            "forget_nll": nll_f.mean().item(),
            "retain_loss": keep.item(),
        }
