"""The measurements behind the default method (docs/unlearning-defaults.md): several
method configurations, each unlearning one person from the 8-person target.

    .venv/bin/python -m benchmarks.sweep_defaults [--quick] 'default alpha=10' 'npo lr=1e-3' ...

`--quick`: the engine's own figures only (its scope checks), without greedy answers.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import BENCH_DIR, target, unlearn_first_person
from benchmarks.unlearn_one_person import measure
from workers.ml.specs import DEFAULT_METHOD


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the greedy-answer measures")
    ap.add_argument("configs", nargs="+", help="'method key=json-value ...'")
    args = ap.parse_args()
    folder, people = target()
    if not args.quick:
        print("before", json.dumps(measure(folder, None, people)), flush=True)
    for k, config in enumerate(args.configs):
        name, *pairs = config.split()
        overrides = {a: json.loads(b) for a, b in (p.split("=", 1) for p in pairs)}
        # "default": the engine's default method with these overrides
        base = DEFAULT_METHOD if name == "default" else {"name": name}
        result, row = unlearn_first_person(
            folder, people, {**base, **overrides}, BENCH_DIR / "sweep" / str(k)
        )
        row = {"config": config, **row}
        out = result.record["outcome"]
        row["check_s"] = round(out["check_seconds"], 1)
        row["evals"] = [
            [e["step"], round(e["forget_prob"], 3), round(e.get("retain_nll", 0), 3)]
            for e in out["evals"]
        ]
        if not args.quick:
            row |= measure(folder, result.adapter_dir, people)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
