"""Landing (`landing_probes`): a scope check every `eval_every` steps sees the forget
items cross their stop level only up to that many steps late, and the forget side can
fall far in those steps (docs/unlearning-defaults.md, "Tenth round": 0.32 -> 0.07 in
four steps against a level of 0.43). When a check first finds the run forgotten, the
adapter is bisected between the last checked state within bounds (not forgotten) and
this one, and the run stops at the least-moved state that a full scope check finds
forgotten and within the retain bounds. Each probe is one scope check (the retain
side only for a state that could be kept); no step is taken.

The path is the straight line between the two states' trainable weights (LoRA's A and
B each), so its ends are exactly the two checked states."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def blend(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    """The weights a fraction `t` of the way from `before` to `after` (t = 1: `after`
    itself, to the last bit)."""
    if t == 1.0:
        return {k: v.clone() for k, v in after.items()}
    return {k: torch.lerp(before[k], after[k], t) for k in after}


def bisect(probe: Callable[[float], T | None], probes: int) -> tuple[float, T | None]:
    """The smallest fraction found in `probes` halvings of (0, 1] whose `probe` accepts
    (returns a result, None for a refusal), assuming a fraction past an accepted one is
    accepted too, and that result (1.0 and None when no probe accepted: the caller keeps
    its own state at 1)."""
    lo, hi, found = 0.0, 1.0, None
    for _ in range(probes):
        mid = (lo + hi) / 2
        result = probe(mid)
        if result is None:
            lo = mid
        else:
            hi, found = mid, result
    return hi, found
