"""Fake quantization of the merged model: what a deployment that quantizes the served
model would see. Per-group absmax (groups of 64 along the input dimension), symmetric,
round to nearest; the weights are put back on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

GROUP = 64


def fake_quantize(weight: torch.Tensor, bits: int, group: int = GROUP) -> torch.Tensor:
    out_f, in_f = weight.shape
    pad = (-in_f) % group
    w = torch.nn.functional.pad(weight.float(), (0, pad)).reshape(out_f, -1, group)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    q = (w / scale).round().clamp(-qmax, qmax) * scale
    return q.reshape(out_f, -1)[:, :in_f].to(weight.dtype)


@contextlib.contextmanager
def fake_quantized(model: Any, bits: int) -> Iterator[None]:
    """The active adapter merged into the base weights, every linear weight (LoRA
    layers' base weights included) quantized; all restored on exit."""
    model.merge_adapter()
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, module in model.named_modules():
                weight = getattr(module, "weight", None)
                if isinstance(module, torch.nn.Linear) and weight is not None and weight.dim() == 2:
                    saved[name] = weight.detach().clone()
                    weight.copy_(fake_quantize(weight, bits))
        yield
    finally:
        with torch.no_grad():
            modules = dict(model.named_modules())
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)
        model.unmerge_adapter()
