"""Per-example log-likelihoods and the retain terms shared by the methods."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from workers.ml.data import IGNORE


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


def token_logprobs(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of each target token [B, T-1] and the mask of target tokens."""
    device = next(model.parameters()).device
    logits = model(**model_inputs(batch, device)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    mask = labels != IGNORE
    logp = -F.cross_entropy(
        logits.transpose(1, 2), labels.clamp(min=0), reduction="none"
    )
    return logp * mask, mask


def sequence_stats(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log p(y|x) and mean NLL over the target tokens, per example."""
    logp, mask = token_logprobs(model, batch)
    total = logp.sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1)
    return total, -total / count


def mean_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-weighted mean NLL over the batch (the usual language-model loss)."""
    logp, mask = token_logprobs(model, batch)
    return -logp.sum() / mask.sum().clamp(min=1)


def kl_to_reference(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(p || p_ref) on the target tokens, the reference being the network with the
    adapter switched off (no second copy of the model)."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    mask = (batch["labels"][:, 1:] != IGNORE).to(device)
    with torch.no_grad(), model.disable_adapter():
        ref = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    cur = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    kl = (cur.exp() * (cur - ref)).sum(dim=-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def retain_loss(model: Any, batch: dict[str, torch.Tensor] | None, kind: str) -> torch.Tensor:
    if batch is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return mean_nll(model, batch) if kind == "nll" else kl_to_reference(model, batch)
