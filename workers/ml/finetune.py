"""Full fine-tuning of a causal LM on QA/text items, saved as a new HF folder.

Not part of unlearning itself: this builds the models that know fictitious people
(the demo's "customer support assistant", benchmark targets, the slow tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.ml import loading
from workers.ml.data import BatchOrder, collate, encode_all
from workers.ml.losses import mean_nll, prefix_sharing


@dataclass
class FinetuneResult:
    folder: Path
    steps: int
    final_loss: float
    seconds: float


def finetune(
    source: str,
    items: list[dict[str, str]],
    out: Path,
    *,
    epochs: float = 3.0,
    lr: float = 5e-5,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    placement: loading.Placement | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> FinetuneResult:
    start = time.perf_counter()
    resolved = loading.resolve(source)
    model, tok = loading.load(resolved, placement or loading.pick_placement())
    torch.manual_seed(seed)
    encoded = encode_all(tok, items, max_length)
    order = BatchOrder(len(encoded), batch_size, seed)
    steps = max(1, round(epochs * -(-len(encoded) // batch_size)))
    # Not fused: fused AdamW takes the built-in model's optimizer step from 0.36 s to
    # 0.07 s on 2 CPU cores, but gives different weights, and the demo's assistant built
    # with it was one the default unlearning method could not erase from without breaking
    # other customers' answers (BENCHMARKS.md, "The demo"). The targets stay as measured.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        # The plain forward: the fine-tune builds the demo's assistant and the benchmark
        # targets, and a shared prefix, exact up to rounding, still gives other weights
        # after 90 steps (the demo's assistant built with it was one the default method
        # did not erase from in two audit rounds). The targets stay as measured.
        with prefix_sharing(False):
            loss = mean_nll(model, collate(encoded, order.batch(step), tok.pad_token_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if progress is not None:
            progress(step + 1, steps, loss_value)
    model.eval()
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return FinetuneResult(out, steps, loss_value, time.perf_counter() - start)
