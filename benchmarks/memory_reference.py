"""Peak memory of an unlearning job on the built-in model: the reference model as the
same network with the adapter disabled (what the engine does) versus a deep copy of the
model (what many implementations do).

Each variant runs in a fresh process (so neither sees the other's allocations): NPO
with a KL retain loss, the method that consults the reference at every step, 8 steps
on one synthetic person's 20 items.

    .venv/bin/python -m benchmarks.memory_reference
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METHOD = {"name": "npo", "retain_loss": "kl", "max_steps": 8, "stop_forget_ratio": None}


def one(mode: str) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from workers.ml import losses, synthetic
    from workers.ml import run as engine
    from workers.ml.run import run_job
    from workers.ml.specs import JobSpec

    if mode == "deepcopy":
        wrap = engine._wrap_with_lora
        holder: dict[str, object] = {}

        def wrap_keeping_a_copy(model, spec, previous):  # type: ignore[no-untyped-def]
            holder["ref"] = copy.deepcopy(model).eval()  # the frozen reference, a second model
            return wrap(model, spec, previous)

        def kl_with_copy(model, batch):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                ref = F.log_softmax(losses.kept_logits(holder["ref"], batch)[0].float(), dim=-1)
            cur = F.log_softmax(losses.kept_logits(model, batch)[0].float(), dim=-1)
            return (cur.exp() * (cur - ref)).sum(dim=-1).mean()

        engine._wrap_with_lora = wrap_keeping_a_copy  # type: ignore[assignment]
        losses.kl_to_reference = kl_with_copy  # type: ignore[assignment]

    people = synthetic.people(3, seed=5)
    spec = JobSpec(
        forget=synthetic.qa_items(people[0]),
        retain=[i for p in people[1:] for i in synthetic.qa_items(p)],
        method=METHOD,
    )
    with tempfile.TemporaryDirectory() as work:
        rec = run_job(spec, Path(work)).record
    return {
        "weights_gib": rec["base_model"]["weights_bytes"] / 2**30,
        "job_peak_rss_gib": rec["job_peak_rss_bytes"] / 2**30,
        "process_peak_rss_gib": rec["peak_rss_bytes"] / 2**30,
        "train_s": rec["durations_s"]["train"],
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2])))
        return
    for mode in ("disabled-adapter", "deepcopy"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory_reference", "--one", mode],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(mode, {k: round(v, 3) for k, v in row.items()}, flush=True)


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
