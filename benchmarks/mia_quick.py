"""The membership-inference AUCs the audit judges (forget vs holdout items, four
scores), for one adapter on a benchmark target, without the audit's generations: a
quick way to see whether a configuration's erasure shows (seconds, not minutes).

    .venv/bin/python -m benchmarks.mia_quick ADAPTER_DIR [--seed 7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import target
from workers.audit.run import AuditInput, _Auditor, _Set
from workers.audit.scores import MIA_SCORES, auc
from workers.ml import synthetic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    folder, people = target(seed=args.seed)
    forget = synthetic.qa_items(people[0])
    holdout = synthetic.holdout_for(people[0])
    a = _Auditor(AuditInput(str(folder), args.adapter, forget, holdout=holdout, device="cpu"))
    sets = {k: _Set.build(a.tok, v, 256) for k, v in (("forget", forget), ("holdout", holdout))}
    for state in ("before", "after"):
        with a.state(state):
            rows = {k: a.measure(s, generate=False)["per_item"] for k, s in sets.items()}
        aucs = {
            m: auc([r[m] for r in rows["forget"]], [r[m] for r in rows["holdout"]])
            for m in MIA_SCORES
        }
        print(state, {m: round(v, 3) if v is not None else None for m, v in aucs.items()})


if __name__ == "__main__":
    main()
