"""RMU: push a middle layer's hidden states on forget inputs towards c*u (u a fixed
random unit vector) and keep them equal to the reference's on retain inputs. The
reference is the network with the adapter switched off."""

from __future__ import annotations

from typing import Any

import torch

from workers.ml.losses import model_inputs
from workers.ml.methods.base import Batch, Method, References, register
from workers.ml.specs import RMU


def _hidden(model: Any, batch: Batch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    out = model(**model_inputs(batch, device), output_hidden_states=True)
    mask = batch["attention_mask"].to(device).unsqueeze(-1).float()
    return out.hidden_states[layer].float(), mask


@register
class RepresentationMisdirection(Method):
    name = "rmu"
    spec_type = RMU

    def prepare(self, model: Any) -> None:
        config = model.config
        self.layer = (
            self.spec.layer if self.spec.layer is not None else config.num_hidden_layers // 2
        )
        if not 0 < self.layer <= config.num_hidden_layers:
            raise ValueError(f"rmu layer must be in 1..{config.num_hidden_layers}")
        g = torch.Generator().manual_seed(self.spec.seed)
        u = torch.rand(config.hidden_size, generator=g)
        self.target = (self.spec.steering_coeff * u / u.norm()).to(next(model.parameters()).device)

    def loss(
        self,
        model: Any,
        forget: Batch,
        retain: Batch | None,
        refs: References,
        substitute: Batch | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        h, mask = _hidden(model, forget, self.layer)
        forget_term = (((h - self.target) ** 2).mean(-1, keepdim=True) * mask).sum() / mask.sum()
        logs = {"forget_loss": forget_term.item()}
        loss = forget_term
        if retain is not None:
            with torch.no_grad(), model.disable_adapter():
                h_ref, _ = _hidden(model, retain, self.layer)
            h_ret, rmask = _hidden(model, retain, self.layer)
            keep = (((h_ret - h_ref) ** 2).mean(-1, keepdim=True) * rmask).sum() / rmask.sum()
            loss = loss + self.spec.alpha * keep
            logs["retain_loss"] = keep.item()
        return loss, logs
