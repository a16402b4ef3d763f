"""Frozen weights kept in 16 bits and multiplied in float32.

On a CPU without bfloat16 matrix instructions (AVX2 only) a job computes in float32:
bfloat16 products are emulated there and ran 4x slower (12.8 against 55 GFLOP/s at a
SmolLM2 layer's shape). But the float32 weights alone are two thirds of the issue's
memory bound (0.50 of 0.77 GiB for SmolLM2-135M), so the activations of a step did not
fit beside them. Here the frozen linear and embedding weights are kept in bfloat16 and
each product casts its layer's weight to float32 as it runs (0.2 ms for a 576 x 1536
layer: about 1 % of the product at a job's sizes): the weights take half the memory,
and every product, activation, norm and loss is float32 as before. The numbers are
those of a float32 model whose weights were rounded to bfloat16 once
(tests/ml/test_stored.py compares logits and LoRA gradients bit for bit); the audit
still judges the adapter on the float32 base, as it is served.

Only the frozen base is stored this way: LoRA weights, norms and biases stay float32,
and a stored weight never receives a gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# A weight cast whole would add its float32 size for the length of the product: for
# SmolLM2's tied 49152 x 576 head 113 MB at the end of a pass, when the pass's
# activations are all held. Larger weights are multiplied in slices of output rows.
SLICE_ELEMENTS = 1 << 22  # 16 MiB of float32


def _row_slices(weight: torch.Tensor) -> list[slice]:
    rows = max(1, SLICE_ELEMENTS // max(1, weight.shape[1]))
    return [slice(s, s + rows) for s in range(0, weight.shape[0], rows)]


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    slices = _row_slices(weight)
    if len(slices) == 1:
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for s in slices:
        b = None if bias is None else bias[s].to(x.dtype)
        out[..., s] = F.linear(x, weight[s].to(x.dtype), b)
    return out


def _input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = None
    for s in _row_slices(weight):
        part = grad[..., s] @ weight[s].to(grad.dtype)
        out = part if out is None else out.add_(part)
    assert out is not None  # a weight has at least one row
    return out


class _StoredLinearFn(torch.autograd.Function):
    """F.linear(x, weight.to(x.dtype), bias) for a frozen weight: keeps the 16-bit
    weight for the backward pass (a reference, not a copy), never the float32 cast."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        return (_input_grad(grad, weight) if ctx.needs_input_grad[0] else None), None, None


class StoredLinear(torch.nn.Linear):
    """A frozen linear layer whose weight is kept in 16 bits and multiplied in the
    input's dtype (`compute_dtype`, the dtype it was loaded in)."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise RuntimeError(
                "a 16-bit stored weight is frozen: train adapters on it, not the weight"
            )
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return _StoredLinearFn.apply(x, self.weight, self.bias)


class StoredEmbedding(torch.nn.Embedding):
    """A frozen embedding table kept in 16 bits whose rows come out in `compute_dtype`."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def _stored_class(cls: type) -> type | None:
    """The stored variant of a linear or embedding class, keeping its own behaviour
    (such as `loading.FlatHead`'s flattening) in front."""
    if issubclass(cls, StoredLinear | StoredEmbedding):
        return cls
    if cls is torch.nn.Linear:
        return StoredLinear
    if cls is torch.nn.Embedding:
        return StoredEmbedding
    for base, stored in ((torch.nn.Linear, StoredLinear), (torch.nn.Embedding, StoredEmbedding)):
        if issubclass(cls, base):
            return _variants.setdefault(cls, type(f"Stored{cls.__name__}", (cls, stored), {}))
    return None


_variants: dict[type, type] = {}


def store_weights(model: Any, dtype: torch.dtype) -> int:
    """Keep the weights of every linear and embedding module of `model` in `dtype`,
    computing in the dtype they had (float32); returns how many modules were switched.
    Norms, biases and other parameters keep their dtype; so do layers of other classes
    (GPT-2's Conv1D), which cost memory but nothing else. A tied weight (an input
    embedding shared with the output head) is cast once and stays shared."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"weights are stored in bfloat16 or float16, not {dtype}")
    cast: dict[int, torch.nn.Parameter] = {}
    switched = 0
    for module in model.modules():
        stored = _stored_class(type(module))
        weight = getattr(module, "weight", None)
        if stored is None or not isinstance(weight, torch.nn.Parameter):
            continue
        if not weight.is_floating_point() or weight.dtype == dtype:
            continue
        compute = weight.dtype
        if id(weight) not in cast:
            cast[id(weight)] = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        module.weight = cast[id(weight)]
        module.__class__ = stored
        module.compute_dtype = compute
        if getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(False)
        switched += 1
    return switched


def stored_modules(model: Any) -> int:
    """How many modules of `model` keep their weights in 16 bits (for the record)."""
    return sum(isinstance(m, StoredLinear | StoredEmbedding) for m in model.modules())


def compute_dtype(model: Any) -> torch.dtype | None:
    """The dtype a stored model's products run in (float32), None when `model` stores
    no weights this way."""
    for m in model.modules():
        if isinstance(m, StoredLinear | StoredEmbedding):
            return m.compute_dtype
    return None
