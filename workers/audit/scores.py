"""Per-example statistics from one teacher-forced pass, and membership-inference AUC.

For each example (prompt x, target y) the pass gives, per target token: log p, whether
the argmax prediction is the token, and Min-K%++'s standardised log p
((log p - mu) / sigma, mu and sigma the mean and standard deviation of log p' under the
model's own next-token distribution p'). From those:
- NLL and probability exp(-NLL);
- exact memorization: share of target tokens predicted by argmax;
- extraction strength: 1 - k*/|y|, k* the smallest prefix length after which every
  argmax prediction equals the rest of y (|y| when even the last token is wrong);
- membership scores, higher = more "member": loss (-NLL), zlib (-summed NLL / zlib
  length of the target text), Min-K% and Min-K%++ (mean of the lowest K% token values).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu

from workers.ml.data import Encoded, collate
from workers.ml.losses import _keep_mask, kept_logits

MIN_K = 0.4  # the lowest 40% of tokens (the value the Min-K% papers recommend)


@dataclass
class TokenStats:
    logp: list[float]
    hit: list[bool]
    zscore: list[float]


def extraction_strength(hits: list[bool]) -> float:
    n = len(hits)
    if n == 0:
        return 0.0
    k = n
    while k > 0 and hits[k - 1]:
        k -= 1
    return 1 - k / n


def min_k(values: list[float], k: float = MIN_K) -> float:
    if not values:
        return 0.0
    m = max(1, math.ceil(len(values) * k))
    return sum(sorted(values)[:m]) / m


def auc(members: list[float], nonmembers: list[float]) -> float | None:
    """P(score of a member > score of a non-member), ties counting half (the
    Mann-Whitney U statistic over n1*n2). None when a side is empty."""
    if not members or not nonmembers:
        return None
    u = mannwhitneyu(members, nonmembers, alternative="two-sided").statistic
    return float(u) / (len(members) * len(nonmembers))


@torch.no_grad()
def token_stats(
    model: Any, encoded: list[Encoded], pad_id: int, batch_size: int = 8
) -> list[TokenStats]:
    model.eval()
    out: list[TokenStats] = []
    for start in range(0, len(encoded), batch_size):
        idx = list(range(start, min(start + batch_size, len(encoded))))
        batch = collate(encoded, idx, pad_id)
        logits, targets = kept_logits(model, batch)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        probs = logprobs.exp()
        token_lp = logprobs.gather(1, targets[:, None]).squeeze(1)
        mu = (probs * logprobs).sum(-1)
        # sum p (log p - mu)^2, not E[log p^2] - mu^2: that difference cancels in float32
        spread = (probs * (logprobs - mu[:, None]).square()).sum(-1)
        sigma = spread.clamp(min=1e-12).sqrt()
        z = (token_lp - mu) / sigma
        hit = logits.argmax(-1) == targets
        rows = _keep_mask(batch["labels"]).nonzero()[:, 0].cpu()
        for r in range(len(idx)):
            sel = (rows == r).nonzero().squeeze(1)
            out.append(
                TokenStats(
                    logp=token_lp.cpu()[sel].tolist(),
                    hit=hit.cpu()[sel].tolist(),
                    zscore=z.cpu()[sel].tolist(),
                )
            )
    return out


def example_metrics(stats: TokenStats, target_text: str) -> dict[str, float]:
    n = max(1, len(stats.logp))
    nll = -sum(stats.logp) / n
    return {
        "prob": math.exp(-nll),
        "nll": nll,
        "exact_memorization": sum(stats.hit) / n,
        "extraction_strength": extraction_strength(stats.hit),
        "mia_loss": -nll,
        "mia_zlib": sum(stats.logp) / max(1, len(zlib.compress(target_text.encode()))),
        "mia_min_k": min_k(stats.logp),
        "mia_min_k_pp": min_k(stats.zscore),
    }


MIA_SCORES = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_pp")
