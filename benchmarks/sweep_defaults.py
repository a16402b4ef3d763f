"""The measurements behind the default method (docs/unlearning-defaults.md): several
method configurations, each unlearning one person from the 8-person target.

    .venv/bin/python -m benchmarks.sweep_defaults 'npo lr=1e-3 alpha=3' 'simnpo lr=1e-3' ...
"""

from __future__ import annotations

import json
import shutil
import sys
import time

from benchmarks.common import BENCH_DIR, target
from benchmarks.unlearn_one_person import measure
from workers.ml import synthetic
from workers.ml.run import run_job
from workers.ml.specs import JobSpec


def main() -> None:
    folder, people = target()
    retain = [i for p in people[1:] for i in synthetic.qa_items(p)]
    print("before", json.dumps(measure(folder, None, people)), flush=True)
    for k, config in enumerate(sys.argv[1:]):
        name, *pairs = config.split()
        overrides = {a: json.loads(b) for a, b in (p.split("=", 1) for p in pairs)}
        workdir = BENCH_DIR / "sweep" / str(k)
        shutil.rmtree(workdir, ignore_errors=True)
        spec = JobSpec(
            model_source=str(folder),
            forget=synthetic.qa_items(people[0]),
            retain=retain,
            holdout=synthetic.holdout_for(people[0]),
            method={"name": name, **overrides},
        )
        t = time.perf_counter()
        out = run_job(spec, workdir).record["outcome"]
        row = {
            "config": config,
            "stopped": out["stopped"],
            "steps": out["steps"],
            "best_step": out["best_step"],
            "train_s": round(out["seconds"], 1),
            "wall_s": round(time.perf_counter() - t, 1),
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
        row |= measure(folder, workdir / "adapter", people)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
