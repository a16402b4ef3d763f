"""GradDiff: gamma * (-NLL_forget) + alpha * retain loss."""

from __future__ import annotations

from typing import Any

import torch

from workers.ml.losses import mean_nll
from workers.ml.methods.base import Batch, Method, References, register
from workers.ml.specs import GradDiff


@register
class GradientDifference(Method):
    name = "graddiff"
    separable_retain = True
    spec_type = GradDiff

    def loss(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        forget_nll = mean_nll(model, forget)
        return self.with_retain(model, retain, -forget_nll, {"forget_nll": forget_nll.item()})
