"""Relabel: fine-tune towards the forget answers with the person's specific values
replaced by synthetic ones (several stand-in sets, workers/ml/stand_ins.py), plus
gamma_npo * NPO on the true answers, plus alpha * retain loss.

Gradient ascent and NPO push the true answer down without saying what should take its
place, so they erode the answer template shared with everyone else's facts before the
values themselves become unlikely. A model that never saw the person answers the same
question with the same template and *some* value; relabelling trains exactly that, by
descent (stable, no collapse), and the true values end up about as likely as any other
value: what the membership test and the holdout stop rule look for. This is the
"alternative labels" idea of Eldan & Russinovich (2023, "Who's Harry Potter?"). Items
whose answer holds no value the stand-ins can replace (a lower-case hobby, say) get only
the NPO term."""

from __future__ import annotations

from typing import Any

import torch

from workers.ml.losses import retain_loss, sequence_stats
from workers.ml.methods.base import Batch, Method, References, ref_slice, register
from workers.ml.methods.npo import npo_term
from workers.ml.specs import Relabel
from workers.ml.stand_ins import alternatives


@register
class Relabelling(Method):
    name = "relabel"
    spec_type = Relabel
    needs_reference = True  # the NPO term

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.unchanged: set[int] = set()

    def substitutes(self, forget: list[dict[str, str]]) -> list[list[dict[str, str]]]:
        versions = alternatives(forget, self.spec.alternatives, self.spec.seed)
        self.unchanged = {
            i for i, (item, alts) in enumerate(zip(forget, versions, strict=True)) if item in alts
        }
        return versions

    def loss(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if substitute is None:
            raise RuntimeError("relabel needs the substitute batch")
        s = self.spec
        logs: dict[str, float] = {}
        device = next(model.parameters()).device
        changed = torch.tensor(
            [int(i) not in self.unchanged for i in forget["index"].tolist()], device=device
        )
        term = torch.zeros((), device=device)
        if changed.any():
            _, sub_nll = sequence_stats(model, substitute)
            relabel = sub_nll[changed].mean()
            term = term + s.gamma * relabel
            logs["relabel_nll"] = relabel.item()
        if s.gamma_npo > 0 or not changed.all():
            logp, nll = sequence_stats(model, forget)
            npo = npo_term(logp, ref_slice(refs.forget, forget, logp.device), s.beta)
            # Items without stand-ins rely on this term alone: weight 1 for them.
            weight = torch.where(changed, torch.full_like(npo, s.gamma_npo), torch.ones_like(npo))
            term = term + (weight * npo).mean()
            logs["forget_nll"] = nll.mean().item()
        keep = retain_loss(model, retain, s.retain_loss)
        logs["forget_loss"] = term.item()
        logs["retain_loss"] = keep.item()
        return term + s.alpha * keep, logs
