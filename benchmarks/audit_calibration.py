"""The audit on the real built-in model, to set and check the policy's defaults.

Runs the default unlearning job on the benchmark target (SmolLM2 fine-tuned on 8
fictitious people, benchmarks/common.py), then audits three adapters with the default
policy: nothing forgotten (an adapter that changes nothing), the default run, and a
stronger run. Prints every metric and the verdicts, and how many of the forgotten
person's secrets greedy answers still reveal (the ground truth the audit stands for).

    .venv/bin/python -m benchmarks.audit_calibration [--methods JSON] [--no-identity]
        [--device cuda] [--dtype float32] [--job-dtype bfloat16] [--out results.jsonl]
        [--seed 7]

`--seed` picks other fictitious people (a new target is built and cached): the
defaults were calibrated on seed 7, so any other seed is data they have never seen.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import BENCH_DIR, load_model, target
from workers.audit.run import AuditInput, audit_adapter
from workers.ml import loading, synthetic
from workers.ml.evaluate import greedy_answers


def identity_adapter(folder: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model, _ = loading.load(loading.resolve(str(folder)), loading.pick_placement("cpu"))
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).save_pretrained(str(out))
    return out


def revealed(
    folder: Path, adapter: Path, person: synthetic.Person, device: str | None, dtype: str | None
) -> tuple[int, int]:
    model, tok = load_model(folder, adapter, device, dtype)
    items = synthetic.qa_items(person)
    answers = greedy_answers(model, tok, [i["prompt"] for i in items])
    hits = synthetic.revealed(answers, synthetic.item_secrets(person))
    return sum(hits), len(hits)


def save_report(folder: Path, name: str, report: dict, base: str) -> None:
    """The audit as the service stores it (JSON) and as its report page shows it."""
    from service.adapters.report import render

    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name)
    (folder / f"{slug}.json").write_text(json.dumps(report, indent=1, default=float))
    manifest = {
        "model": f"calibration target ({base})",
        "version": name,
        "base_model": {"source": base, "digest": report["environment"]["base_model_digest"]},
        "covered_requests": ["(the benchmark's forgotten person)"],
        "method": {"name": name},
    }
    (folder / f"{slug}.html").write_text(render(report, manifest))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--methods",
        default='{"default": null}',
        help="JSON: name -> method parameters (null: the engine's default), each run and audited",
    )
    ap.add_argument("--no-identity", action="store_true", help="skip the nothing-forgotten audit")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (target, jobs and audits)")
    ap.add_argument("--dtype", default="float32", help="of the audits (and of the jobs)")
    ap.add_argument(
        "--job-dtype", help="the jobs' compute dtype when it differs from the audits' (bfloat16)"
    )
    ap.add_argument("--out", type=Path, help="also append one JSON line per adapter here")
    ap.add_argument("--reports", type=Path, help="also write each full audit here as JSON and HTML")
    ap.add_argument("--seed", type=int, default=7, help="the fictitious people (target) to use")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="key=json-value overrides of the engine's default method (its run is then "
        "named 'default+')",
    )
    args = ap.parse_args()
    if args.set:
        from workers.ml.specs import DEFAULT_METHOD

        overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
        args.methods = json.dumps({"default+": {**DEFAULT_METHOD, **overrides}})
    place = {"device": args.device, "dtype": args.dtype}
    folder, people = target(seed=args.seed, device=args.device)
    person = people[0]
    forget = synthetic.qa_items(person)
    retain = [i for p in people[1:] for i in synthetic.qa_items(p)]
    holdout = synthetic.holdout_for(person)
    runs: dict[str, Path] = {}
    trained: dict[str, dict] = {}
    if not args.no_identity:
        runs["nothing forgotten"] = identity_adapter(folder, BENCH_DIR / "identity-adapter")

    from workers.ml.run import run_job
    from workers.ml.specs import JobSpec

    for name, method in json.loads(args.methods).items():
        slug = "".join(c if c.isalnum() else "-" for c in name)
        work = BENCH_DIR / f"calib-s{args.seed}-{slug}"
        shutil.rmtree(work, ignore_errors=True)  # run_job would resume an earlier run's checkpoint
        spec = JobSpec(
            model_source=str(folder),
            forget=forget,
            retain=retain,
            holdout=holdout,
            **({"method": method} if method is not None else {}),
            **(place | ({"dtype": args.job_dtype} if args.job_dtype else {})),
        )
        t = time.perf_counter()
        res = run_job(spec, work)
        rec, outcome = res.record, res.record["outcome"]
        print(
            f"{name}: trained in {time.perf_counter() - t:.0f}s, "
            f"stopped {outcome['stopped']} after {outcome['steps']} steps; training "
            f"{outcome['seconds']:.1f} s (checks {outcome['check_seconds']:.1f} s), job peak "
            f"{rec['job_peak_rss_bytes'] / 2**30:.3f} GiB, {rec['environment']['dtype']}, "
            f"attention {rec['environment'].get('attention')}",
            flush=True,
        )
        runs[name] = res.adapter_dir
        trained[name] = {
            "train_s": round(time.perf_counter() - t, 1),
            "training_s": round(outcome["seconds"], 1),
            "check_s": round(outcome["check_seconds"], 1),
            "job_peak_rss_gib": round(rec["job_peak_rss_bytes"] / 2**30, 3),
            **{k: outcome[k] for k in ("stopped", "steps", "best_step")},
        }

    for name, adapter in runs.items():
        t = time.perf_counter()
        report = audit_adapter(
            AuditInput(str(folder), adapter, forget, retain=retain, holdout=holdout, **place)
        )
        audit_s = time.perf_counter() - t
        hit, total = revealed(folder, adapter, person, **place)
        print(
            f"\n== {name}: audit {audit_s:.0f}s, verdict "
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
        if args.reports:
            save_report(args.reports, name, report, str(folder))
        if args.out:
            row = {
                "name": name,
                "method": json.loads(args.methods).get(name),
                **trained.get(name, {}),
                "audit_s": round(audit_s, 1),
                "passed": report["verdict"]["passed"],
                "revealed": [hit, total],
                "criteria": {
                    c["name"]: [c["value"], c["threshold"], c["passed"]]
                    for c in report["verdict"]["criteria"]
                },
                "summary": report["summary"],
                "device": args.device,
                "dtype": args.dtype,
                "job_dtype": args.job_dtype or args.dtype,
                "seed": args.seed,
            }
            with args.out.open("a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
