"""Where one unlearning step's time goes on the built-in model: the forget pass, the
retain pass (NLL, or KL with the adapter-off reference), the backward pass, and a
scope check; with the tokens each item costs. Prints one line per part (mean of
`--repeat` timed runs after one warm-up).

    .venv/bin/python -m benchmarks.step_profile [--batch 4] [--retain-batch 4] [--repeat 3]
        [--dtype bfloat16] [--lora-layers 8]

`--lora-layers N`: LoRA on the top N blocks only; the parts then run from the frozen
trunk's kept states (workers/ml/trunk.py), and one more line says what filling it for
every forget and retain item costs once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from workers.ml import loading, synthetic
from workers.ml.data import Encoded, collate, encode_all
from workers.ml.losses import kl_to_reference, mean_nll, sequence_stats
from workers.ml.memwatch import rss_bytes
from workers.ml.run import lora_target_args
from workers.ml.training import CHECK_BATCH, Datasets, scope_metrics, sequence_logprobs
from workers.ml.trunk import frozen_trunk


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.fmean(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--retain-batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16 (the weights')")
    ap.add_argument("--lora-layers", type=int, help="adapt only the top N blocks")
    args = ap.parse_args()
    before = rss_bytes()
    model, tok = loading.load(
        loading.resolve("builtin:smollm2-135m-instruct"), loading.pick_placement("cpu", args.dtype)
    )
    loaded = rss_bytes()
    torch.manual_seed(0)
    adapted = lora_target_args(model, args.lora_layers, "all-linear")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, **adapted))
    people = synthetic.people(8, seed=7)
    forget = encode_all(tok, synthetic.qa_items(people[0]), 256)
    retain = encode_all(tok, [i for p in people[1:] for i in synthetic.qa_items(p)], 256)
    pad = tok.pad_token_id
    f_batch = collate(forget, list(range(args.batch)), pad)
    r_batch = collate(retain, list(range(args.retain_batch)), pad)
    tokens = [len(e.input_ids) for e in forget]
    targets = [sum(1 for t in e.labels if t != -100) for e in forget]
    print(
        f"threads {torch.get_num_threads()}; forget item: {statistics.fmean(tokens):.0f} "
        f"tokens, of which {statistics.fmean(targets):.0f} targets; batch {args.batch} "
        f"pads to {f_batch['input_ids'].shape[1]}"
    )

    data = Datasets(forget=forget, retain=retain, retain_eval=24)
    check_items = forget + data.retain_sample()

    model.train()
    with frozen_trunk(model) as trunk:
        if trunk is not None:
            t = time.perf_counter()
            with torch.no_grad():
                for items in (forget, retain):
                    for start in range(0, len(items), CHECK_BATCH):
                        idx = list(range(start, min(start + CHECK_BATCH, len(items))))
                        b = collate(items, idx, pad)
                        trunk.hidden(b["input_ids"], b["attention_mask"])
            what = f"trunk of {trunk.start} blocks, {trunk.computed} items, once"
            print(f"{what:55s} {time.perf_counter() - t:6.2f} s", flush=True)
        _profile(model, args.repeat, f_batch, r_batch, data, pad, check_items)
    gib = 2**30
    print(
        f"resident memory: {before / gib:.2f} GiB before loading, {loaded / gib:.2f} GiB "
        f"loaded ({loading.weights_bytes(model) / gib:.2f} GiB of weights), "
        f"{rss_bytes() / gib:.2f} GiB after the steps"
    )


def _profile(
    model: Any,
    repeat: int,
    f_batch: dict[str, torch.Tensor],
    r_batch: dict[str, torch.Tensor],
    data: Datasets,
    pad: int,
    check_items: list[Encoded],
) -> None:
    """Time each part of a step (mean of `repeat` runs after a warm-up)."""
    forget = data.forget

    def forget_fwd() -> None:
        with torch.no_grad():
            sequence_stats(model, f_batch)

    def forget_fwd_bwd() -> None:
        model.zero_grad()
        sequence_stats(model, f_batch)[1].mean().backward()

    def retain_nll_fwd_bwd() -> None:
        model.zero_grad()
        mean_nll(model, r_batch).backward()

    def retain_kl_fwd_bwd() -> None:
        model.zero_grad()
        kl_to_reference(model, r_batch).backward()

    def check() -> None:
        scope_metrics(model, data, pad)

    def check_passes(size: int) -> Callable[[], None]:
        return lambda: sequence_logprobs(model, check_items, pad, batch_size=size)

    for name, fn in (
        ("forget forward", forget_fwd),
        ("forget forward+backward", forget_fwd_bwd),
        ("retain NLL forward+backward", retain_nll_fwd_bwd),
        ("retain KL (reference + forward+backward)", retain_kl_fwd_bwd),
        (f"scope check ({len(forget)} forget + 24 retain items, forward)", check),
        (
            f"the check's {len(check_items)} items in passes of {CHECK_BATCH}",
            check_passes(CHECK_BATCH),
        ),
        (f"... in passes of {len(check_items)}", check_passes(len(check_items))),
    ):
        print(f"{name:55s} {timed(fn, repeat):6.2f} s", flush=True)


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
