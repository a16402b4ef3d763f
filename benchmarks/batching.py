"""Batching: sixteen erasure requests in one job against sixteen jobs of one.

The service batches the pending requests of a model into one job; requests that arrive
one by one become a chain of jobs, each continuing from the version before (the
workers run one job per model at a time). This benchmark runs both on the engine, as the
workers call it (round 0, the model's default method, no audit):

- `batch`: one job whose forget set is all sixteen people's items and whose holdout is
  their sixteen stand-ins, each request's runs marked as `workers.pipeline` marks them
  (`forget_groups`, `holdout_groups`: each request held to the stop rule and given a job
  of one's step budget); `--ungrouped` runs it as one undivided forget set (the service
  before 2026-12-01), and `--batch-people 4` batches only the first four requests
  (compared with the chain's first four versions); stored as `batch16`,
  `batch16_ungrouped`, `batch4`...;
- `chain`: sixteen jobs of one person each, job k continuing from version k-1 (the
  first five versions are also the sequential-requests benchmark: earlier forgetting
  must hold at every version).

Target: SmolLM2 fine-tuned on `--requests + --kept` fictitious people; retain data is
the kept people's items. After a job: how many secrets of each forgotten person the
greedy answers still state, how many of the kept people's the model still answers, and
general knowledge. Jobs already done (a record under var/bench/batching/) are reused,
so an interrupted run resumes. Writes var/bench/batching.json and, for the chain,
var/bench/sequential.json and sequential.png.

    .venv/bin/python -m benchmarks.batching [--requests 16] [--kept 4] [--arms batch,chain]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, load_model, target
from benchmarks.sequential import plot
from benchmarks.unlearn_one_person import secret_hits
from workers.ml import evaluate, synthetic
from workers.ml.run import run_job
from workers.ml.specs import JobSpec

OUT = BENCH_DIR / "batching"


def measure(folder: Path, adapter: Path | None, forgotten: list, kept: list) -> dict[str, Any]:
    t = time.perf_counter()
    model, tok = load_model(folder, adapter)
    acc, _ = evaluate.probe_accuracy(model, tok)
    return {
        "forgotten_hits": [secret_hits(model, tok, p) for p in forgotten],
        "kept_hits": [secret_hits(model, tok, p) for p in kept],
        "probe_accuracy": round(acc, 3),
        "eval_s": round(time.perf_counter() - t, 1),
    }


def job(
    folder: Path,
    people: list,
    retain: list,
    previous: Path | None,
    work: Path,
    grouped: bool = True,
) -> dict[str, Any]:
    """One engine job forgetting `people` (reused when its folder holds a finished one)."""
    done = work / "record.json"
    if not done.is_file():
        forget = [synthetic.qa_items(p) for p in people]
        holdout = [synthetic.holdout_for(p) for p in people]
        groups = grouped and len(people) > 1
        spec = JobSpec(
            model_source=str(folder),
            forget=[i for items in forget for i in items],
            forget_groups=[len(items) for items in forget] if groups else None,
            retain=retain,
            holdout=[i for items in holdout for i in items],
            holdout_groups=[len(items) for items in holdout] if groups else None,
            previous_adapter=str(previous) if previous else None,
        )
        run_job(spec, work)
    record = json.loads(done.read_text())
    out = record["outcome"]
    return {
        "forget_items": record["items"]["forget"],
        "batched_requests": record.get("batched_requests", 1),
        "max_steps": record["method"]["max_steps"],
        "check_s": round(out["check_seconds"], 1),
        "stopped": out["stopped"],
        "steps": out["steps"],
        "best_step": out["best_step"],
        "train_s": round(out["seconds"], 1),
        "job_s": round(record["durations_s"]["total"], 1),  # load + training + saving
        "job_peak_rss_gb": round(record["job_peak_rss_bytes"] / 2**30, 2),
        "forget_prob": [
            round(out["base"]["forget_prob"], 3),
            round(out["final"]["forget_prob"], 3),
        ],
        "holdout_prob": round(out["base"].get("holdout_prob", float("nan")), 3),
        "retain_nll": [round(out["base"]["retain_nll"], 3), round(out["final"]["retain_nll"], 3)],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--kept", type=int, default=4)
    ap.add_argument("--arms", default="batch,chain")
    ap.add_argument("--ungrouped", action="store_true", help="the batch arm as one forget set")
    ap.add_argument("--batch-people", type=int, help="people in the batch arm (--requests)")
    ap.add_argument(
        "--eval-versions",
        default="1,2,3,4,5,8,12,16",
        help="chain versions measured with greedy answers (every one costs a minute)",
    )
    args = ap.parse_args()
    folder, people = target(n_people=args.requests + args.kept)
    forgotten, kept = people[: args.requests], people[args.requests :]
    retain = [i for p in kept for i in synthetic.qa_items(p)]
    results_path = BENCH_DIR / "batching.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))

    if "target" not in results:
        results["target"] = measure(folder, None, forgotten, kept)
        save()
    print("target", json.dumps(results["target"]), flush=True)

    if "batch" in args.arms.split(","):
        batch = forgotten[: args.batch_people or args.requests]
        arm = f"batch{len(batch)}" + ("_ungrouped" if args.ungrouped else "")
        row = job(folder, batch, retain, None, OUT / arm, grouped=not args.ungrouped)
        if "forgotten_hits" not in results.get(arm, {}):
            row |= measure(folder, OUT / arm / "adapter", batch, kept)
        else:
            row = results[arm] | row
        results[arm] = row
        save()
        print(arm, json.dumps(row), flush=True)

    if "chain" in args.arms.split(","):
        evaluated = {int(v) for v in args.eval_versions.split(",")}
        chain = {r["version"]: r for r in results.get("chain", [])}
        previous = None
        for v in range(1, args.requests + 1):
            work = OUT / f"chain-v{v}"
            row = {"version": v, **job(folder, [forgotten[v - 1]], retain, previous, work)}
            if v in evaluated:
                if "forgotten_hits" in chain.get(v, {}):
                    row = chain[v] | row
                else:
                    row |= measure(folder, work / "adapter", forgotten[:v], kept)
            chain[v] = row
            results["chain"] = [chain[k] for k in sorted(chain)]
            save()
            print("chain", json.dumps(row), flush=True)
            previous = work / "adapter"
        seq = [{"version": 0, **results["target"], "forgotten_hits": []}]
        seq += [r for r in results["chain"] if "forgotten_hits" in r]
        (BENCH_DIR / "sequential.json").write_text(json.dumps(seq, indent=1))
        plot(seq, BENCH_DIR / "sequential.png")
    print(f"wrote {results_path}")


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
