"""Gradient ascent: push the forget answers' likelihood down. The baseline; without
scope control it collapses the model."""

from __future__ import annotations

from typing import Any

import torch

from workers.ml.losses import mean_nll
from workers.ml.methods.base import Batch, Method, References, register
from workers.ml.specs import GA


@register
class GradientAscent(Method):
    name = "ga"
    spec_type = GA

    def loss(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        forget_nll = mean_nll(model, forget)
        return -forget_nll, {"forget_nll": forget_nll.item()}
