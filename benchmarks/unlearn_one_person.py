"""Unlearn one fictitious person from a SmolLM2 that was fine-tuned to know 8 of them.

For each method: training wall time, steps, why it stopped, tokens/s, peak memory, and
what the model reveals before/after (greedy answers containing the person's secret
values), what it still knows about another person, and general-knowledge accuracy.

    .venv/bin/python -m benchmarks.unlearn_one_person [--methods npo,simnpo,...] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from benchmarks.common import BENCH_DIR, target
from workers.ml import evaluate, loading, synthetic
from workers.ml.run import run_job
from workers.ml.specs import METHOD_NAMES, JobSpec


def secret_hits(model, tok, person) -> int:
    """How many of the 20 questions about `person` get an answer stating the secret."""
    items = synthetic.qa_items(person)
    answers = evaluate.greedy_answers(model, tok, [i["prompt"] for i in items])
    return sum(synthetic.revealed(answers, synthetic.item_secrets(person)))


def measure(folder, adapter, people) -> dict:
    from peft import PeftModel

    model, tok = loading.load(loading.resolve(str(folder)), loading.pick_placement())
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    acc, _ = evaluate.probe_accuracy(model, tok)
    return {
        "forgotten_person_hits": secret_hits(model, tok, people[0]),
        "other_person_hits": secret_hits(model, tok, people[1]),
        "probe_accuracy": round(acc, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHOD_NAMES))
    ap.add_argument("--set", nargs="*", default=[], help="method overrides, key=value")
    ap.add_argument("--no-eval", action="store_true", help="skip the before/after generations")
    args = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}

    folder, people = target()
    retain = [i for p in people[1:] for i in synthetic.qa_items(p)]
    before = None if args.no_eval else measure(folder, None, people)
    if before:
        print("before", json.dumps(before), flush=True)
    rows = []
    for name in args.methods.split(","):
        workdir = BENCH_DIR / "runs" / name
        shutil.rmtree(workdir, ignore_errors=True)
        spec = JobSpec(
            model_source=str(folder),
            forget=synthetic.qa_items(people[0]),
            retain=retain,
            holdout=synthetic.holdout_for(people[0]),
            method={"name": name, **overrides},
        )
        t = time.perf_counter()
        result = run_job(spec, workdir)
        wall = time.perf_counter() - t
        out = result.record["outcome"]
        row = {
            "method": name,
            "stopped": out["stopped"],
            "steps": out["steps"],
            "train_s": round(out["seconds"], 1),
            "job_wall_s": round(wall, 1),
            "tokens_per_s": round(out["tokens"] / out["seconds"], 1),
            "job_peak_rss_gb": round(result.record["job_peak_rss_bytes"] / 2**30, 2),
            "weights_gb": round(result.record["base_model"]["weights_bytes"] / 2**30, 2),
            "forget_prob": [
                round(out["base"]["forget_prob"], 3),
                round(out["final"]["forget_prob"], 3),
            ],
            "holdout_prob": round(out["base"].get("holdout_prob", float("nan")), 3),
            "retain_nll": [
                round(out["base"]["retain_nll"], 3),
                round(out["final"]["retain_nll"], 3),
            ],
        }
        if not args.no_eval:
            row |= measure(folder, result.adapter_dir, people)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"before": before, "runs": rows, "overrides": overrides}, indent=1))


if __name__ == "__main__":
    main()
