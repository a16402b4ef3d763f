"""The demo's erasure through the engine alone (no service, no audit): how much of the
forgotten customer's facts go, and how many of *every* kept customer's facts survive
(the demo itself shows only one kept customer).

    .venv/bin/python -m benchmarks.demo_erasure [--set key=value ...]

Needs the demo's assistant (`unlearn demo` builds and caches it under var/demo). Forget:
customer 0's 10 records; retain: the other 11 customers' 110; holdout: synthesized, as
the pipeline does; method: the default, with `--set` overrides (JSON values).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from service import demo
from workers.ml import synthetic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assistant", default="var/demo/assistant-e6-lr0.0002")
    ap.add_argument("--set", action="append", default=[], help="method override key=value")
    ap.add_argument("--workdir", default="var/bench/demo-erasure")
    args = ap.parse_args()

    from workers.ml.run import run_job
    from workers.ml.specs import DEFAULT_METHOD, JobSpec
    from workers.ml.stand_ins import synthesize

    folder = Path(args.assistant)
    people = demo.customers(12)
    gone, kept = people[0], people[1:]
    method = dict(DEFAULT_METHOD)
    for kv in args.set:
        key, _, value = kv.partition("=")
        method[key] = json.loads(value)
    forget = demo.customer_items(gone)
    spec = JobSpec(
        model_source=str(folder),
        forget=forget,
        retain=[i for p in kept for i in demo.customer_items(p)],
        holdout=synthesize(forget),
        method=method,
    )
    questions = [i["prompt"] for p in people for i in demo.customer_items(p, (0,))]
    secrets = [s for p in people for s in synthetic.fact_secrets(p, demo.FACTS)]
    n = len(demo.FACTS)
    before = synthetic.revealed(demo.answers(folder, questions), secrets)

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    t = time.perf_counter()
    result = run_job(spec, workdir)
    wall = time.perf_counter() - t
    after = synthetic.revealed(demo.answers(folder, questions, result.adapter_dir), secrets)

    out = result.record["outcome"]
    lost = [questions[i] for i in range(n, len(questions)) if before[i] and not after[i]]
    print(
        json.dumps(
            {
                "overrides": args.set,
                "stopped": out["stopped"],
                "steps": out["steps"],
                "best_step": out["best_step"],
                "train_s": round(out["seconds"], 1),
                "job_wall_s": round(wall, 1),
                "base": {k: round(v, 4) for k, v in out["base"].items()},
                "final": {k: round(v, 4) for k, v in out["final"].items()},
                "forgotten_revealed": [sum(before[:n]), sum(after[:n])],
                "kept_revealed": [sum(before[n:]), sum(after[n:])],
                "kept_of_customer_1": [sum(before[n : 2 * n]), sum(after[n : 2 * n])],
                "kept_lost": lost,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
