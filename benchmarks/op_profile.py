"""Where a short default job's time goes, operator by operator (`torch.profiler`): the
job on a benchmark target, then the operators sorted by their own CPU time.

    .venv/bin/python -m benchmarks.op_profile [--steps 8] [--seed 11] [--dtype bfloat16]
        [--shapes] [--rows 40]

`--shapes` groups by input shapes too (which products are LoRA's, which the shared
prefix's batch-1 pass). The profiler's own overhead stretches the wall time; the shares
are what it is for.
"""

from __future__ import annotations

import argparse
import shutil
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.common import BENCH_DIR, first_person_spec, target
from workers.ml.run import run_job
from workers.ml.specs import DEFAULT_METHOD


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=11, help="the target's people")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shapes", action="store_true", help="group by input shapes")
    ap.add_argument("--rows", type=int, default=40)
    args = ap.parse_args()
    folder, people = target(seed=args.seed)
    spec = first_person_spec(
        folder, people, {**DEFAULT_METHOD, "max_steps": args.steps}, dtype=args.dtype
    )
    work = BENCH_DIR / "op-profile"
    shutil.rmtree(work, ignore_errors=True)  # run_job would resume a checkpoint found there
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        res = run_job(spec, work)
    rec = res.record
    print(
        f"wall {time.perf_counter() - t:.1f} s (profiled), training "
        f"{rec['durations_s']['train']:.1f} s, of it checks {rec['outcome']['check_seconds']:.1f} s"
    )
    table = prof.key_averages(group_by_input_shape=args.shapes)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
