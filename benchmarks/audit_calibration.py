"""The audit on the real built-in model, to set and check the policy's defaults.

Runs the default unlearning job on the benchmark target (SmolLM2 fine-tuned on 8
fictitious people, benchmarks/common.py), then audits three adapters with the default
policy: nothing forgotten (an adapter that changes nothing), the default run, and a
stronger run. Prints every metric and the verdicts, and how many of the forgotten
person's secrets greedy answers still reveal (the ground truth the audit stands for).

    .venv/bin/python -m benchmarks.audit_calibration [--methods JSON] [--no-identity]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, target
from workers.audit.run import AuditInput, audit_adapter
from workers.ml import loading, synthetic
from workers.ml.evaluate import greedy_answers


def identity_adapter(folder: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model, _ = loading.load(loading.resolve(str(folder)), loading.pick_placement("cpu"))
    get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).save_pretrained(str(out))
    return out


def revealed(folder: Path, adapter: Path, person: synthetic.Person) -> tuple[int, int]:
    from peft import PeftModel

    model, tok = loading.load(loading.resolve(str(folder)), loading.pick_placement("cpu"))
    model = PeftModel.from_pretrained(model, str(adapter))
    items = synthetic.qa_items(person)
    answers = greedy_answers(model, tok, [i["prompt"] for i in items])
    hits = synthetic.revealed(answers, synthetic.item_secrets(person))
    return sum(hits), len(hits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--methods",
        default='{"default npo": {"name": "npo"}}',
        help="JSON: name -> method parameters, each run and audited",
    )
    ap.add_argument("--no-identity", action="store_true", help="skip the nothing-forgotten audit")
    args = ap.parse_args()
    folder, people = target()
    person = people[0]
    forget = synthetic.qa_items(person)
    retain = [i for p in people[1:] for i in synthetic.qa_items(p)]
    holdout = synthetic.holdout_for(person)
    runs = {}
    if not args.no_identity:
        runs["nothing forgotten"] = identity_adapter(folder, BENCH_DIR / "identity-adapter")

    from workers.ml.run import run_job
    from workers.ml.specs import JobSpec

    for name, method in json.loads(args.methods).items():
        work = BENCH_DIR / ("calib-" + "".join(c if c.isalnum() else "-" for c in name))
        spec = JobSpec(
            model_source=str(folder), forget=forget, retain=retain, holdout=holdout, method=method
        )
        t = time.perf_counter()
        res = run_job(spec, work)
        print(
            f"{name}: trained in {time.perf_counter() - t:.0f}s, "
            f"stopped {res.record['outcome']['stopped']}",
            flush=True,
        )
        runs[name] = res.adapter_dir

    for name, adapter in runs.items():
        t = time.perf_counter()
        report = audit_adapter(
            AuditInput(str(folder), adapter, forget, retain=retain, holdout=holdout)
        )
        hit, total = revealed(folder, adapter, person)
        print(
            f"\n== {name}: audit {time.perf_counter() - t:.0f}s, verdict "
            f"{'PASS' if report['verdict']['passed'] else 'FAIL'}; secrets revealed {hit}/{total}"
        )
        for c in report["verdict"]["criteria"]:
            print(
                f"  {'ok  ' if c['passed'] else 'FAIL'} {c['name']:28s} {c['value']:.3f} "
                f"(threshold {c['threshold']:.3f})"
            )
        print(
            "  metrics:",
            json.dumps({k: v for k, v in report["summary"].items()}, default=lambda x: round(x, 3)),
        )


if __name__ == "__main__":
    main()
