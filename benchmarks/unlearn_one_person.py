"""Unlearn one fictitious person from a SmolLM2 that was fine-tuned to know 8 of them.

For each method: training wall time, steps, why it stopped, tokens/s, peak memory, and
what the model reveals before/after (greedy answers containing the person's secret
values), what it still knows about another person, and general-knowledge accuracy.

    .venv/bin/python -m benchmarks.unlearn_one_person [--methods npo,simnpo,...] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import BENCH_DIR, load_model, target, unlearn_first_person
from workers.ml import evaluate, synthetic
from workers.ml.specs import METHOD_NAMES


def secret_hits(model, tok, person) -> int:
    """How many of the 20 questions about `person` get an answer stating the secret."""
    items = synthetic.qa_items(person)
    answers = evaluate.greedy_answers(model, tok, [i["prompt"] for i in items])
    return sum(synthetic.revealed(answers, synthetic.item_secrets(person)))


def measure(folder, adapter, people) -> dict:
    model, tok = load_model(folder, adapter)
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
    before = None if args.no_eval else measure(folder, None, people)
    if before:
        print("before", json.dumps(before), flush=True)
    rows = []
    for name in args.methods.split(","):
        result, row = unlearn_first_person(
            folder, people, {"name": name, **overrides}, BENCH_DIR / "runs" / name
        )
        row = {"method": name, **row}
        if not args.no_eval:
            row |= measure(folder, result.adapter_dir, people)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"before": before, "runs": rows, "overrides": overrides}, indent=1))


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
