"""LoRA on 16-bit weights without float32 copies of every adapted layer's input.

PEFT keeps adapters in float32 under bfloat16 weights and casts each adapted layer's
input to float32 before `lora_A`; autograd then keeps that float32 copy for `lora_A`'s
weight gradient, one per adapted layer (q, k and v each keep their own copy of the same
input). On SmolLM2 those copies were over half of a step's activations (139 of ~250 MiB
for 4 items). Here `lora_A` receives the 16-bit input, casts it itself and keeps only the
16-bit tensor, re-casting it in the backward pass: the cast from bfloat16 or float16 to
float32 is exact, so the forward and the gradients are the very numbers PEFT's path
computes (tests/ml/test_memory.py compares them bit for bit).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class _UpcastLinear(torch.autograd.Function):
    """F.linear(x.to(weight.dtype), weight), saving x as it came (16-bit)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.enable_grad():  # autograd's own backward of the cast and the product
            wide = x.detach().to(weight.dtype).requires_grad_(need_x)
            w = weight.detach().requires_grad_(need_w)
            out = F.linear(wide, w)
        wanted = [t for t, need in ((wide, need_x), (w, need_w)) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        gx = next(grads).to(x.dtype) if need_x else None
        gw = next(grads) if need_w else None
        return gx, gw


def _upcasting_forward(linear: Any) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == linear.weight.dtype:
            return F.linear(x, linear.weight)
        return _UpcastLinear.apply(x, linear.weight)

    return forward


def keep_inputs_16bit(model: Any) -> int:
    """Switch every plain LoRA layer of `model` whose base weights are 16-bit and whose
    adapters are float32 to the lean path; returns how many were switched. Layers with a
    variant (DoRA), dropout or a bias on `lora_A` keep PEFT's own path."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear) or module.lora_variant:
            continue
        base_dtype = module.get_base_layer().weight.dtype
        if base_dtype not in (torch.bfloat16, torch.float16):
            continue
        plain = all(
            isinstance(module.lora_dropout[name], torch.nn.Identity)
            and module.lora_A[name].bias is None
            and module.lora_A[name].weight.dtype == torch.float32
            for name in module.lora_A
        )
        if not plain:
            continue
        module.cast_input_dtype_enabled = False  # PEFT's switch: lora_A gets x as it is
        for linear in module.lora_A.values():
            linear.forward = _upcasting_forward(linear)
        switched += 1
    return switched
