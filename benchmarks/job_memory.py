"""Resident memory over one unlearning job on an 8-person target: the job's peak growth,
when it happens, and the resident set after each step, so a peak at load time can be
told from one that builds up while training.

    .venv/bin/python -m benchmarks.job_memory [--dtype bfloat16] [--steps 8] [--seed 7]
        [--set gradient_checkpointing=true ...] [--heap] [--phases]

`--steps 48` runs the default method's whole job (it stops when forgotten). `--phases`
says where the peak and the time are: the resident set sampled every 5 ms under a label
for what the loop is doing (by the engine functions it is inside; time counted to the
innermost).

Run each configuration in a fresh process (the allocator keeps what an earlier job
freed); glibc's own settings, such as MALLOC_MMAP_THRESHOLD_=65536, go in the
environment.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.common import BENCH_DIR, first_person_spec, target
from workers.ml import general, training
from workers.ml.memwatch import PeakRSS, heap_info, rss_bytes
from workers.ml.methods.base import Method
from workers.ml.run import run_job
from workers.ml.specs import DEFAULT_METHOD

GIB = 2**30
MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", help="float32 or bfloat16 (default: the engine's pick)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7, help="the target's people")
    ap.add_argument("--set", nargs="*", default=[], help="method settings, key=json-value")
    ap.add_argument(
        "--heap",
        action="store_true",
        help="after every 4th step, what is live: tensors (by dtype) and glibc's heap",
    )
    ap.add_argument("--phases", action="store_true", help="peak and time by what the loop does")
    args = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    folder, people = target(seed=args.seed)
    spec = first_person_spec(
        folder, people, {**DEFAULT_METHOD, "max_steps": args.steps, **overrides}, dtype=args.dtype
    )
    steps: list[int] = []
    work = BENCH_DIR / "job-memory"
    shutil.rmtree(work, ignore_errors=True)  # run_job would resume a checkpoint found there
    phases = Phases() if args.phases else None
    with PeakRSS() as mem, phases.watching() if phases else _nothing():

        def after_step(_f: float, logs: dict[str, float]) -> None:
            steps.append(rss_bytes())
            if args.heap and int(logs.get("step", 0)) % 4 == 0:
                print(f"step {int(logs['step'])}: {live_memory()}", flush=True)

        res = run_job(spec, work, progress=after_step)
    rec = res.record
    print(
        f"{rec['environment']['dtype']} {overrides or 'defaults'}: training "
        f"{rec['durations_s']['train']:.1f} s, job peak {rec['job_peak_rss_bytes'] / GIB:.3f} "
        f"GiB (at {mem.peak_at:.1f} s; load took {rec['durations_s']['load']:.1f} s); "
        f"{rec['outcome']['steps']} steps, stopped {rec['outcome']['stopped']}, forget "
        f"probability {rec['outcome']['final']['forget_prob']:.4f}"
    )
    print("after each step:", " ".join(f"{(rss - mem.start) / GIB:.2f}" for rss in steps))
    if phases is not None:
        for label, peak in sorted(phases.peak.items(), key=lambda kv: -kv[1]):
            print(
                f"{label:28s} peak {(peak - mem.start) / GIB:.3f} GiB, "
                f"time {phases.seconds.get(label, 0.0):6.1f} s"
            )


# (owner, function, label): what the loop is doing while inside that function
PHASE_FUNCTIONS: list[tuple[Any, str, str]] = [
    (Method, "backward", "step: forget pass"),  # and the retain pass of a joint loss
    (Method, "retain_backward", "step: retain pass"),
    (training, "forget_logprobs", "check: forget items"),
    (training, "retain_state", "check: retain guard"),
    (training, "logprobs_and_entropies", "step 0: holdout"),
    (training, "land", "landing"),
    (training, "answers_clear", "check: greedy answers"),
    (training, "answers_broken", "check: greedy answers"),
    (general, "_decode", "general answers"),  # the jobs' path: cached_reference_items
]


class Phases:
    """Peak resident set and (innermost) time per phase of a job in this process."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = [["load, optimizer and the rest", time.perf_counter()]]
        self.peak: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def _charge(self) -> None:
        now = time.perf_counter()
        label = self.stack[-1][0]
        self.seconds[label] = self.seconds.get(label, 0.0) + now - self.stack[-1][1]
        self.stack[-1][1] = now

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inside(*a: Any, **k: Any) -> Any:
            self._charge()
            self.stack.append([label, time.perf_counter()])
            try:
                return fn(*a, **k)
            finally:
                self._charge()
                self.stack.pop()
                self.stack[-1][1] = time.perf_counter()

        return inside

    @contextmanager
    def watching(self) -> Iterator[None]:
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PHASE_FUNCTIONS]
        for owner, name, label in PHASE_FUNCTIONS:
            setattr(owner, name, self._wrap(getattr(owner, name), label))
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                rss, label = rss_bytes(), self.stack[-1][0]
                self.peak[label] = max(self.peak.get(label, 0), rss)

        sampler = threading.Thread(target=sample, daemon=True, name="phase-sampler")
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()
            self._charge()
            for owner, name, fn in originals:
                setattr(owner, name, fn)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def live_memory() -> str:
    """Live tensors' storages by dtype, and glibc's heap, in MiB."""
    storages: dict[int, tuple[int, str]] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            storages[st.data_ptr()] = (st.nbytes(), str(obj.dtype).removeprefix("torch."))
    by_dtype: dict[str, int] = {}
    for size, dtype in storages.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    tensors = ", ".join(f"{d} {n / MIB:.0f}" for d, n in sorted(by_dtype.items()) if n >= MIB)
    heap = heap_info()
    glibc = "" if heap is None else ", ".join(f"{k} {v / MIB:.0f}" for k, v in heap.items())
    return f"tensors MiB: {tensors}; heap MiB: {glibc}"


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
