"""What a greedy decode costs in time and resident memory inside a job: the same prompts
through the plain model's `generate` and with a LoRA adapter's layers in place (the
engine's `stop_answers_leak` / `stop_answers_kept` decode so; docs/engine.md, "Scope
control"). Prints one line per case: seconds and the peak RSS growth while it ran.

    .venv/bin/python -m benchmarks.decode_memory [--seed 7] [--rows 24] [--new 35]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import torch

from benchmarks.common import target
from workers.ml import loading, synthetic
from workers.ml.data import prompt_ids
from workers.ml.memwatch import rss_bytes, trim_heap, tune_heap
from workers.ml.run import _wrap_with_lora
from workers.ml.specs import default_method


def peak_growth(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, GiB of peak RSS above the start) of one call, sampled every 5 ms."""
    trim_heap()
    start, peak, done = rss_bytes(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t = time.perf_counter()
    with torch.no_grad():
        fn()
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    return seconds, (max(peak[0], rss_bytes()) - start) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=7, help="the benchmark target (fictitious people)")
    ap.add_argument("--rows", type=int, default=24, help="prompts decoded in one batch")
    ap.add_argument("--new", type=int, default=35, help="new tokens per answer")
    args = ap.parse_args()
    tune_heap()
    folder, people = target(seed=args.seed)
    items = [i for p in people[1:] for i in synthetic.qa_items(p)][: args.rows]
    placement = loading.pick_placement(None, None, training=True)  # the job's dtype
    model, tok = loading.load(loading.resolve(str(folder)), placement)
    model.eval()
    rows = [prompt_ids(tok, i["prompt"]) for i in items]
    width, pad = max(map(len, rows)), tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = (ids != pad).long()
    for k, r in enumerate(rows):  # a pad id inside a prompt still counts
        mask[k, width - len(r) :] = 1

    def decode(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=args.new,
            pad_token_id=pad,
        )

    print(f"{args.rows} prompts, {args.new} new tokens, {placement.dtype}")
    seconds, gib = peak_growth(decode(model))
    print(f"plain model            {seconds:6.2f} s   +{gib:.3f} GiB")
    adapted = _wrap_with_lora(model, default_method(), None)
    adapted.eval()
    seconds, gib = peak_growth(decode(adapted))
    print(f"LoRA layers in place   {seconds:6.2f} s   +{gib:.3f} GiB")


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
