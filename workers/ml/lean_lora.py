"""LoRA layers that compute PEFT's very numbers with less kept and fewer passes.

On 16-bit weights, without float32 copies of every adapted layer's input:

PEFT keeps adapters in float32 under bfloat16 weights and casts each adapted layer's
input to float32 before `lora_A`; autograd then keeps that float32 copy for `lora_A`'s
weight gradient, one per adapted layer (q, k and v each keep their own copy of the same
input). On SmolLM2 those copies were over half of a step's activations (139 of ~250 MiB
for 4 items). Here `lora_A` receives the 16-bit input, casts it itself and keeps only the
16-bit tensor, re-casting it in the backward pass: the cast from bfloat16 or float16 to
float32 is exact, so the forward and the gradients are the very numbers PEFT's path
computes (tests/ml/test_memory.py compares them bit for bit).

`sum_in_place` is the other half: PEFT's `result + lora_B(lora_A(x)) * scaling` makes two
new tensors of the layer's output size (the scaled product, then the sum) and a third
pass over it; here the scaling goes into `lora_B`'s small weight when it is a power of
two (exact: the same numbers) and the sum is written into the product's own tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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


def _plain(module: Any) -> bool:
    """One LoRA adapter on a plain linear layer: no variant (DoRA), dropout or biases."""
    return not module.lora_variant and all(
        isinstance(module.lora_dropout[name], torch.nn.Identity)
        and module.lora_A[name].bias is None
        and module.lora_B[name].bias is None
        for name in module.lora_A
    )


def _plain_layers(model: Any) -> Iterator[Any]:
    """The LoRA linear layers of `model` that `_plain` accepts."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return (m for m in model.modules() if isinstance(m, LoraLinear) and _plain(m))


def keep_inputs_16bit(model: Any) -> int:
    """Switch every plain LoRA layer of `model` whose base weights are 16-bit and whose
    adapters are float32 to the lean path; returns how many were switched. Layers with a
    variant (DoRA), dropout or biases keep PEFT's own path."""
    switched = 0
    for module in _plain_layers(model):
        base_dtype = module.get_base_layer().weight.dtype
        if base_dtype not in (torch.bfloat16, torch.float16):
            continue
        if any(a.weight.dtype != torch.float32 for a in module.lora_A.values()):
            continue
        module.cast_input_dtype_enabled = False  # PEFT's switch: lora_A gets x as it is
        for linear in module.lora_A.values():
            linear.forward = _upcasting_forward(linear)
        switched += 1
    return switched


def _summing_forward(module: Any) -> Any:
    peft_forward = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in module.active_adapters if a in module.lora_A]
        if module.disable_adapters or module.merged or args or kwargs or len(active) != 1:
            return peft_forward(x, *args, **kwargs)
        name = active[0]
        result = module.base_layer(x)
        lora_a, weight_b = module.lora_A[name], module.lora_B[name].weight
        scaling = module.scaling[name]
        exact = scaling > 0 and math.frexp(scaling)[0] == 0.5  # a power of two
        delta = F.linear(
            lora_a(module._cast_input_dtype(x, lora_a.weight.dtype)),
            weight_b * scaling if exact else weight_b,
        )
        if not exact:
            delta = delta.mul_(scaling)
        return delta.add_(result).to(result.dtype)  # PEFT's sum, in the product's tensor

    return forward


def sum_in_place(model: Any) -> int:
    """Give every plain LoRA layer of `model` the in-place sum (`_summing_forward`), in
    any dtype; returns how many. Anything but one active adapter on a layer that is not
    merged falls back to PEFT's own forward."""
    switched = 0
    for module in _plain_layers(model):
        module.forward = _summing_forward(module)
        switched += 1
    return switched
