"""Sequential requests (MUSE's "sustainability"): five erasure requests for one model,
one after another, each job continuing from the previous version (versions 1 to 5).

After each version: how many secrets of every person forgotten so far the greedy
answers still reveal (earlier forgetting must hold), the same for the three people
never asked about (kept), the forget probability of each forgotten person, and
general-knowledge accuracy. Writes `sequential.json` and `sequential.png` (utility and
forgetting per version) under var/bench/.

    .venv/bin/python -m benchmarks.sequential [--method JSON] [--versions 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from benchmarks.common import BENCH_DIR, load_model, target
from benchmarks.unlearn_one_person import secret_hits
from workers.ml import evaluate, synthetic
from workers.ml.run import run_job
from workers.ml.specs import JobSpec


def measure(folder, adapter, people, forgotten: int) -> dict:  # type: ignore[no-untyped-def]
    model, tok = load_model(folder, adapter)
    acc, _ = evaluate.probe_accuracy(model, tok)
    return {
        "forgotten_hits": [secret_hits(model, tok, p) for p in people[:forgotten]],
        "kept_hits": [secret_hits(model, tok, p) for p in people[-3:]],
        "probe_accuracy": round(acc, 3),
    }


def plot(rows: list[dict], path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = [r["version"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(versions, [r["probe_accuracy"] for r in rows], "o-", label="general-knowledge accuracy")
    ax.plot(
        versions,
        [sum(r["kept_hits"]) / (20 * len(r["kept_hits"])) for r in rows],
        "s-",
        label="kept people: secrets answered",
    )
    asked = [r for r in rows if r["forgotten_hits"]]  # version 0 has forgotten nobody
    ax.plot(
        [r["version"] for r in asked],
        [sum(r["forgotten_hits"]) / (20 * len(r["forgotten_hits"])) for r in asked],
        "^-",
        label="forgotten people: secrets revealed",
    )
    ax.set_xlabel("adapter version (0 = before any request)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="{}", help="JSON: method parameters (default: defaults)")
    ap.add_argument("--versions", type=int, default=5)
    args = ap.parse_args()
    method = json.loads(args.method)
    folder, people = target()
    retain_people = people[args.versions :]
    rows = [{"version": 0, **measure(folder, None, people, 0)}]
    print(json.dumps(rows[-1]), flush=True)
    previous = None
    for v in range(1, args.versions + 1):
        person = people[v - 1]
        work = BENCH_DIR / "sequential" / f"v{v}"
        shutil.rmtree(work, ignore_errors=True)
        spec = JobSpec(
            model_source=str(folder),
            forget=synthetic.qa_items(person),
            retain=[i for p in retain_people for i in synthetic.qa_items(p)],
            holdout=synthetic.holdout_for(person),
            previous_adapter=str(previous) if previous else None,
            **({"method": method} if method else {}),
        )
        t = time.perf_counter()
        res = run_job(spec, work)
        out = res.record["outcome"]
        row = {
            "version": v,
            "train_s": round(time.perf_counter() - t, 1),
            "stopped": out["stopped"],
            "steps": out["steps"],
            "forget_prob": [
                round(out["base"]["forget_prob"], 3),
                round(out["final"]["forget_prob"], 3),
            ],
            **measure(folder, res.adapter_dir, people, v),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        previous = res.adapter_dir
    (BENCH_DIR / "sequential.json").write_text(json.dumps(rows, indent=1))
    plot(rows, BENCH_DIR / "sequential.png")
    print(f"wrote {BENCH_DIR / 'sequential.json'} and {BENCH_DIR / 'sequential.png'}")


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
