"""The membership-inference AUCs the audit judges (forget vs holdout items, four
scores), for one adapter on a benchmark target, without the audit's generations: a
quick way to see whether a configuration's erasure shows (seconds, not minutes).

    .venv/bin/python -m benchmarks.mia_quick ADAPTER_DIR [--seed 7] [--tokens]
    .venv/bin/python -m benchmarks.mia_quick ADAPTER_DIR --assistant var/demo/assistant-...

`--assistant`: the demo's assistant and its erasure instead (customer 0 against the
stand-ins the pipeline synthesizes; benchmarks.demo_erasure writes such an adapter).

`--tokens`: also where a low Min-K%++ comes from, on the answers' value tokens (the
person's dates, numbers, names): their mean log-probability, its 5 % quantile, the
model's mean top-choice probability there, and the mean Min-K%++ score per item.
Never-seen values are unlikely *and* uncertain; an erasure that shows leaves the model
confidently wrong instead.

`--worst`: per item, its Min-K%++ score and its three lowest-scoring tokens (the token,
its log p, its z-score, the model's top choice there and that choice's probability): a
single position where the model is near-certain of another token can carry an item's
score by itself (docs/engine.md, "Calibrated forgetting").
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import target
from workers.audit.run import AuditInput, _Auditor, _Set
from workers.audit.scores import MIA_SCORES, auc, min_k, token_stats
from workers.ml import synthetic
from workers.ml.data import collate, value_token_weights
from workers.ml.losses import _keep_mask, kept_logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--tokens", action="store_true", help="the value-token breakdown too")
    ap.add_argument("--worst", action="store_true", help="each item's lowest-scoring tokens")
    ap.add_argument("--assistant", type=Path, help="the demo's assistant instead of a target")
    args = ap.parse_args()
    if args.assistant:
        from service import demo
        from workers.ml.stand_ins import synthesize

        folder = args.assistant
        forget = demo.customer_items(demo.customers(12)[0])
        holdout = synthesize(forget)
    else:
        folder, people = target(seed=args.seed)
        forget = synthetic.qa_items(people[0])
        holdout = synthetic.holdout_for(people[0])
    a = _Auditor(AuditInput(str(folder), args.adapter, forget, holdout=holdout, device="cpu"))
    sets = {k: _Set.build(a.tok, v, 256) for k, v in (("forget", forget), ("holdout", holdout))}
    for state in ("before", "after"):
        with a.state(state):
            rows = {k: a.measure(s, generate=False)["per_item"] for k, s in sets.items()}
            if args.tokens:
                for name, s in sets.items():
                    print(state, name, value_tokens(a.model, a.tok, s))
            if args.worst:
                for name, s in sets.items():
                    for i, line in enumerate(worst_tokens(a.model, a.tok, s)):
                        print(state, name, i, line)
        aucs = {
            m: auc([r[m] for r in rows["forget"]], [r[m] for r in rows["holdout"]])
            for m in MIA_SCORES
        }
        print(state, {m: round(v, 3) if v is not None else None for m, v in aucs.items()})


@torch.no_grad()
def value_tokens(model: Any, tok: Any, s: _Set) -> dict[str, float]:
    """On the set's value tokens: mean and 5 % quantile of log p, mean top-choice
    probability; and the mean Min-K%++ score of the items (all their tokens)."""
    masks = value_token_weights(tok, s.items, s.encoded, other=0.0)
    logp: list[float] = []
    top: list[float] = []
    for start in range(0, len(s.encoded), 8):
        idx = list(range(start, min(start + 8, len(s.encoded))))
        batch = collate(s.encoded, idx, tok.pad_token_id, masks)
        logits, targets = kept_logits(model, batch)
        lp = F.log_softmax(logits.float(), dim=-1)
        on_value = batch["weights"][:, 1:][_keep_mask(batch["labels"])[:, :-1]] > 0
        logp += lp.gather(1, targets[:, None]).squeeze(1)[on_value].tolist()
        top += lp.max(-1).values.exp()[on_value].tolist()
    scores = [min_k(st.zscore) for st in token_stats(model, s.encoded, tok.pad_token_id)]
    return {
        "value_logp_mean": round(statistics.fmean(logp), 2),
        "value_logp_q05": round(float(torch.tensor(logp).quantile(0.05)), 2),
        "value_top_prob": round(statistics.fmean(top), 2),
        "min_k_pp_mean": round(statistics.fmean(scores), 2),
    }


@torch.no_grad()
def worst_tokens(model: Any, tok: Any, s: _Set, n: int = 3) -> list[str]:
    """Per item: its Min-K%++ score, then its `n` lowest-z tokens."""
    lines = []
    for st, enc in zip(token_stats(model, s.encoded, tok.pad_token_id), s.encoded, strict=True):
        batch = collate([enc], [0], tok.pad_token_id)
        logits, targets = kept_logits(model, batch)
        top = F.softmax(logits.float(), dim=-1).max(-1)
        worst = sorted(range(len(st.zscore)), key=lambda j: st.zscore[j])[:n]
        cells = [
            f"{tok.decode([int(targets[j])])!r} logp {st.logp[j]:.1f} z {st.zscore[j]:.0f} "
            f"top {tok.decode([int(top.indices[j])])!r} {float(top.values[j]):.2f}"
            for j in worst
        ]
        lines.append(f"min_k_pp {min_k(st.zscore):.1f} | " + " | ".join(cells))
    return lines


if __name__ == "__main__":
    main()
