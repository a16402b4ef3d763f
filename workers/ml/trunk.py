"""The frozen trunk: when LoRA adapts only the top layers (`lora_layers`), the layers
below the first adapted one compute the same function of the tokens at every step,
with the adapter on or off. Their output for each item (the hidden states entering the
first adapted layer) is computed once, kept, and every later forward pass (training
steps, the KL reference, scope checks) runs only the adapted layers on it. The backward
pass stops there anyway: nothing below requires a gradient.

How the model is cut: its decoder's `layers` list is swapped for a slice for the
duration of a call (the model's own forward does the rest: masks, rotary positions,
the final norm, the head), with the final norm switched off for the bottom part.
The top part enters through `inputs_embeds`, which is exact for architectures whose
embedding output goes to the first layer unchanged (Llama, Qwen, Mistral and
relatives); one that adds position embeddings or scales them (GPT-2, Gemma) would
differ, so each model class is checked once against the plain forward, as the shared
prefix is (losses.py), and used only if they agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Kept hidden states per job at most (float32 SmolLM2: 2.3 KB a token, a 60-token item
# 0.14 MB, so 256 MiB holds ~1800 items). Items past it are recomputed when needed.
CACHE_BUDGET_BYTES = 256 * 2**20

_ACTIVE: dict[int, Trunk] = {}


def decoder_of(model: Any) -> Any | None:
    """The module holding the transformer blocks as `layers` and a final `norm`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
    if isinstance(layers, nn.ModuleList) and isinstance(norm, nn.Module):
        return inner
    return None


def first_adapted_layer(model: Any) -> int | None:
    """The index of the lowest block holding an adapter's weights (None: no blocks, or
    no adapter). Everything below it is the frozen trunk."""
    inner = decoder_of(model)
    if inner is None:
        return None
    for k, layer in enumerate(inner.layers):
        if any("lora_" in name for name, _ in layer.named_parameters()):
            return k
    return None


@contextmanager
def _only(inner: Any, layers: list[nn.Module], final_norm: bool) -> Iterator[None]:
    """The decoder runs `layers` only (and its final norm only if `final_norm`)."""
    saved_layers, saved_norm = inner.layers, inner.norm
    inner.layers = nn.ModuleList(layers)
    if not final_norm:
        inner.norm = nn.Identity()
    try:
        yield
    finally:
        inner.layers, inner.norm = saved_layers, saved_norm


class Trunk:
    """The kept outputs of layers [0, start) per item (keyed by its token ids)."""

    def __init__(self, model: Any, start: int) -> None:
        inner = decoder_of(model)
        if inner is None:
            raise ValueError("the model has no `layers` of blocks to cut")
        self.model, self.start, self.inner = model, start, inner
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.bytes = 0
        self.computed = 0  # items run through the trunk (cache misses)

    def state(self) -> dict[tuple[int, ...], torch.Tensor]:
        """The kept states, for a checkpoint: a resumed run must read the very numbers
        the uninterrupted one did (a batch of another shape rounds differently)."""
        return dict(self.cache)

    def restore(self, state: dict[tuple[int, ...], torch.Tensor]) -> None:
        self.cache = dict(state)
        self.bytes = sum(t.nbytes for t in self.cache.values())

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The trunk's output for a right-padded batch [B, T, D] (zeros at padding)."""
        lengths = mask.sum(dim=1).tolist()
        keys = [tuple(ids[k, :n].tolist()) for k, n in enumerate(lengths)]
        missing = sorted({k for k, key in enumerate(keys) if key not in self.cache})
        fresh: dict[tuple[int, ...], torch.Tensor] = {}
        if missing:
            width = max(lengths[k] for k in missing)
            layers = list(self.inner.layers)[: self.start]
            with torch.no_grad(), _only(self.inner, layers, final_norm=False):
                out = self.inner(
                    input_ids=ids[missing, :width],
                    attention_mask=mask[missing, :width],
                    use_cache=False,
                ).last_hidden_state
            self.computed += len(missing)
            for row, k in enumerate(missing):
                state = out[row, : lengths[k]].detach().clone()
                fresh[keys[k]] = state
                if self.bytes + state.nbytes <= CACHE_BUDGET_BYTES:
                    self.cache[keys[k]] = state
                    self.bytes += state.nbytes
        rows = [self.cache.get(key, fresh.get(key)) for key in keys]
        first = rows[0]
        assert first is not None
        out = first.new_zeros((len(rows), ids.shape[1], first.shape[-1]))
        for k, state in enumerate(rows):
            assert state is not None
            out[k, : state.shape[0]] = state
        return out

    def logits(
        self, inputs: dict[str, torch.Tensor], keep: torch.Tensor, shared: int = 0
    ) -> torch.Tensor:
        """The kept logits [N, V] of the whole model, from the trunk's output. `shared`:
        the batch's first tokens, the same in every row, go through the adapted blocks
        once (batch 1) and their keys and values are repeated over the batch (the
        shared prefix of losses.py, on the top blocks only)."""
        mask = inputs["attention_mask"]
        h = self.hidden(inputs["input_ids"], mask)
        layers = list(self.inner.layers)[self.start :]
        with _only(self.inner, layers, final_norm=True):
            if shared:
                out = self._shared_top(h, mask, keep, shared)
            else:
                out = self.model(
                    inputs_embeds=h, attention_mask=mask, use_cache=False, logits_to_keep=keep
                ).logits
        if out.dim() != 2 or out.shape[0] != int(keep.sum()):
            raise TypeError("boolean logits_to_keep not honoured")
        return out

    def _shared_top(
        self, h: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, p: int
    ) -> torch.Tensor:
        head = self.model(
            inputs_embeds=h[:1, :p], attention_mask=mask[:1, :p], use_cache=True, logits_to_keep=1
        )
        cache = head.cache  # transformers 5: `cache` (formerly past_key_values)
        cache.batch_repeat_interleave(h.shape[0])
        # The cache holds the adapted blocks' keys only (indices start..): the model reads
        # the length of what is cached from block 0's slot, so that slot shows block
        # `start`'s (read before the rest is appended). Positions are given explicitly.
        cache.layers[0] = cache.layers[self.start]
        positions = torch.arange(p, h.shape[1], device=h.device).unsqueeze(0)
        return self.model(
            inputs_embeds=h[:, p:],
            attention_mask=mask,
            cache=cache,
            use_cache=True,
            position_ids=positions,
            logits_to_keep=keep[:, p:],
        ).logits


def active(model: Any) -> Trunk | None:
    return _ACTIVE.get(id(model))


@contextmanager
def frozen_trunk(model: Any) -> Iterator[Trunk | None]:
    """Within the block, `losses.kept_logits` runs `model` from its trunk's kept output
    (when it has a trunk: an adapter that leaves the lowest blocks alone). Yields the
    trunk, or None when the model has none."""
    start = first_adapted_layer(model)
    if not start or id(model) in _ACTIVE:
        yield None
        return
    trunk = Trunk(model, start)
    _ACTIVE[id(model)] = trunk
    try:
        yield trunk
    finally:
        del _ACTIVE[id(model)]


def trunk_record(trunk: Trunk | None, paths: dict[str, bool]) -> dict[str, Any] | None:
    """What the record says: the blocks kept frozen, which paths passed their check
    (`losses.trunk_paths`), and how many items the trunk ran and kept."""
    if trunk is None:
        return None
    return {
        "frozen_layers": trunk.start,
        **paths,
        "items_computed": trunk.computed,
        "kept_bytes": trunk.bytes,
    }
