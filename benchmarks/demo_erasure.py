"""The demo's erasure through the engine alone (no service, no audit): how much of the
forgotten customer's facts go, and how many of *every* kept customer's facts survive
(the demo itself shows only one kept customer).

    .venv/bin/python -m benchmarks.demo_erasure [--set key=value ...] [--round N] [--audit]

Needs the demo's assistant (`unlearn demo` builds and caches it under var/demo). Forget:
customer 0's 10 records; retain: the other 11 customers' 110; holdout: synthesized, as
the pipeline does; method: the default, with `--set` overrides (JSON values), as the
pipeline's audit retry `--round` runs it (`workers.pipeline.method_for_round`; 0: as
asked). `--audit` then audits the adapter as the pipeline does and prints the failed
criteria, so a demo that failed can be replayed round by round without the service.
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
    ap.add_argument("--round", type=int, default=0, help="the pipeline's audit retry round")
    ap.add_argument("--overshot", action="store_true", help="the round before overshot")
    ap.add_argument(
        "--too-sure", action="store_true", help="the round before failed Min-K%%++ low alone"
    )
    ap.add_argument("--audit", action="store_true", help="audit the adapter as the pipeline")
    args = ap.parse_args()

    from workers.ml.run import run_job
    from workers.ml.specs import DEFAULT_METHOD, JobSpec
    from workers.ml.stand_ins import synthesize
    from workers.pipeline import method_for_round

    folder = Path(args.assistant)
    people = demo.customers(12)
    gone, kept = people[0], people[1:]
    method = dict(DEFAULT_METHOD)
    for kv in args.set:
        key, _, value = kv.partition("=")
        method[key] = json.loads(value)
    method = method_for_round(method, args.round, overshot=args.overshot, too_sure=args.too_sure)
    forget = demo.customer_items(gone)
    retain = [i for p in kept for i in demo.customer_items(p)]
    holdout = synthesize(forget)
    spec = JobSpec(
        model_source=str(folder), forget=forget, retain=retain, holdout=holdout, method=method
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
    if args.audit:
        from workers.audit.policy import AuditPolicy
        from workers.audit.run import AuditInput, audit_adapter

        t = time.perf_counter()
        audit = audit_adapter(
            AuditInput(
                model_source=str(folder),
                adapter_dir=Path(result.adapter_dir),
                forget=forget,
                retain=retain,
                holdout=holdout,
                holdout_source="synthesized",
                policy=AuditPolicy(),
                max_length=spec.method.max_length,
            )
        )
        verdict = audit["verdict"]
        print(
            json.dumps(
                {
                    "audit_passed": verdict["passed"],
                    "audit_s": round(time.perf_counter() - t, 1),
                    "criteria": {c["name"]: round(c["value"], 3) for c in verdict["criteria"]},
                    "failed": [c["message"] for c in verdict["failed"]],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
