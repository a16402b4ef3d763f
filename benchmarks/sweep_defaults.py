"""The measurements behind the default method (docs/unlearning-defaults.md): several
method configurations, each unlearning one person from the 8-person target.

    .venv/bin/python -m benchmarks.sweep_defaults [--quick] [--seed 11] 'default alpha=10' ...

`--quick`: the engine's own figures only (its scope checks), without greedy answers.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import BENCH_DIR, target, unlearn_first_person
from benchmarks.unlearn_one_person import measure
from workers.ml.specs import DEFAULT_METHOD

EVAL_KEYS = ("forget_prob", "retain_nll", "retain_kept", "forget_stated", "forget_pending")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the greedy-answer measures")
    ap.add_argument("--seed", type=int, default=7, help="the fictitious people (target) to use")
    ap.add_argument("configs", nargs="+", help="'method key=json-value ...'")
    args = ap.parse_args()
    folder, people = target(seed=args.seed)
    if not args.quick:
        print("before", json.dumps(measure(folder, None, people)), flush=True)
    for k, config in enumerate(args.configs):
        name, *pairs = config.split()
        overrides = {a: json.loads(b) for a, b in (p.split("=", 1) for p in pairs)}
        # "default": the engine's default method with these overrides
        base = DEFAULT_METHOD if name == "default" else {"name": name}
        result, row = unlearn_first_person(
            folder, people, {**base, **overrides}, BENCH_DIR / f"sweep-s{args.seed}" / str(k)
        )
        row = {"config": config, **row}
        out = result.record["outcome"]
        row["check_s"] = round(out["check_seconds"], 1)
        row["evals"] = [
            # step, forget probability, retain NLL, answers kept, values stated, items pushed
            [e["step"], *(round(e.get(k, -1), 3) for k in EVAL_KEYS)]
            for e in out["evals"]
        ]
        if not args.quick:
            row |= measure(folder, result.adapter_dir, people)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
